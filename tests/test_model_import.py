"""`rbee-mesh model import`: a GGUF file already on this machine into its hive's catalog, as a
person does it (real processes, real files), with no queen running."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rbee_mesh.inference.gguf_file import read_gguf_info, write_tiny_gguf
from tests.clitools import Mesh, json_events


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    return Mesh(tmp_path / "state")


def catalog_files(mesh: Mesh) -> list[str]:
    root = mesh.home / "hive" / "models"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_a_gguf_file_is_imported_whole_with_its_digest_and_facts(
    mesh: Mesh, tmp_path: Path
) -> None:
    source = write_tiny_gguf(tmp_path / "My Model.Q8.gguf", context_length=2048)
    done = mesh.run("--json", "model", "import", str(source), timeout=60)
    assert done.returncode == 0, done.stderr
    entry = json_events(done.stdout)[-1]["result"]
    assert entry["id"] == "local/My-Model.Q8:My-Model.Q8.gguf"  # type: ignore[index]
    assert entry["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()  # type: ignore[index]
    listed = mesh.run("--json", "model", "list", timeout=60)
    [row] = json_events(listed.stdout)[-1]["result"]  # type: ignore[misc]
    assert row["gguf"] == {
        "architecture": "llama", "quantization": "F16", "context_length": 2048,
        "parameters": read_gguf_info(source).parameter_count, "chat_template": False,
    }  # fmt: skip
    shown = mesh.run("model", "list", timeout=60).stdout
    assert "llama" in shown and "F16" in shown and "2048" in shown
    stored = mesh.home / "hive" / "models" / "local--My-Model.Q8--My-Model.Q8.gguf"
    assert (stored / "My-Model.Q8.gguf").read_bytes() == source.read_bytes()
    assert json.loads((stored / "model.json").read_text())["gguf"] == row["gguf"]


@pytest.mark.parametrize("what", ["not gguf", "truncated", "empty"])
def test_a_file_that_is_not_a_whole_gguf_is_refused_and_nothing_is_added(
    mesh: Mesh, tmp_path: Path, what: str
) -> None:
    good = write_tiny_gguf(tmp_path / "good.gguf", context_length=2048).read_bytes()
    data = {"not gguf": b"hello, world\n", "truncated": good[:4096], "empty": b""}[what]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    refused = mesh.run("model", "import", str(bad), timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "INVALID_REQUEST" in refused.stderr and str(bad) in refused.stderr
    assert catalog_files(mesh) == []  # no entry, no partial copy


def test_importing_a_model_twice_is_a_conflict_and_a_name_sets_its_id(
    mesh: Mesh, tmp_path: Path
) -> None:
    source = write_tiny_gguf(tmp_path / "tiny.gguf", context_length=2048)
    assert mesh.run("model", "import", str(source), timeout=60).returncode == 0
    again = mesh.run("model", "import", str(source), timeout=60)
    assert again.returncode == 1 and "already" in again.stderr
    named = mesh.run("--json", "model", "import", str(source), "--name", "me/tiny", timeout=60)
    assert named.returncode == 0, named.stderr
    assert json_events(named.stdout)[-1]["result"]["id"] == "me/tiny:tiny.gguf"  # type: ignore[index]


def test_a_missing_file_is_a_usage_error(mesh: Mesh, tmp_path: Path) -> None:
    missing = mesh.run("model", "import", str(tmp_path / "nowhere.gguf"), timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
