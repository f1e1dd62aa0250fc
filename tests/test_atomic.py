"""Atomic writes: the target is replaced whole or not at all."""

import json

import numpy as np
import pytest

from softtriple.atomic import atomic_path, write_json


def test_write_json_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_failure_keeps_the_previous_file(tmp_path):
    path = tmp_path / "r.npz"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.npz"]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a real full disk (needs the right to mount; skipped elsewhere)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'}); "
                    f"the disk-full case needs one")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_disk):
    import numpy as np
    import torch

    from softtriple.atomic import DiskFullError
    from softtriple.experiment.checkpoint import load_checkpoint, save_checkpoint

    path = small_disk / "run" / "checkpoints" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(10)}, "config": {}})
    with pytest.raises(DiskFullError, match=r"^no space left on device while writing .*last\.pt "
                                            r"\(its previous version is kept\)[^\n]*$"):
        save_checkpoint(path, {"model": {"w": torch.zeros(200_000)}, "config": {}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(10))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    with pytest.raises(DiskFullError, match="nothing was written"), \
            atomic_path(small_disk / "emb.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, embeddings=np.zeros((200_000,), np.float32))
    assert sorted(p.name for p in small_disk.iterdir()) == ["run"]


def test_embeddings_streamed_in_blocks_equal_the_array_written_whole(tmp_path):
    from softtriple.experiment.run_folder import read_class_names, read_embeddings, write_embeddings
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    labels, paths = np.arange(10) % 3, [f"img{i}.png" for i in range(10)]
    whole = write_embeddings(tmp_path / "whole", x, labels, paths, [f"c{i}" for i in labels])
    blocks = write_embeddings(tmp_path / "blocks.npz", iter([x[:0], x[:4], x[4:9], x[9:]]),
                              labels, paths, [f"c{i}" for i in labels])
    for file in (whole, blocks):
        got, got_labels, got_paths = read_embeddings(file)
        np.testing.assert_array_equal(got, x)
        np.testing.assert_array_equal(got_labels, labels)
        assert got_paths == paths and read_class_names(file) == [f"c{i}" for i in labels]
    with pytest.raises(ValueError, match="9 embeddings for 10 labels"):
        write_embeddings(tmp_path / "short.npz", iter([x[:9]]), labels, paths)
    assert not (tmp_path / "short.npz").exists()  # nothing half-written
