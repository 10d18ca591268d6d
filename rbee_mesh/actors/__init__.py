"""The actors of a mesh: queen, keeper (client), and later hive and worker."""
