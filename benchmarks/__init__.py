"""Benchmarks of rbee-mesh: each module measures one thing and says how (see its docstring)."""
