"""Bad input through the command line, table-driven: each row is a command and the one line it
must print; every row must exit with status 2, print exactly one line on stderr, and show no
traceback. (The loss and metric APIs' own rows live in test_loss_inputs.py and
test_evaluation.py; hostile pickles are at the end of this file.)"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from softtriple.cli import main
from test_data import make_cub
from test_training import tiny


@pytest.fixture(scope="module")
def world(data_root, tmp_path_factory):
    """A trained tiny run, its embeddings, a CUB copy and a CSV set, with broken variants."""
    from softtriple.training import Trainer

    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    Trainer(tiny(run, "schedule.epochs=1", "evaluation.before_training=false",
                 "evaluation.metrics=[recall]")).train()
    assert main(["embed", str(run), "--out", str(root / "emb.npz")]) == 0
    np.save(root / "nan.npy", np.full(8, np.nan, np.float32))
    np.save(root / "wide.npy", np.ones(9, np.float32))
    (root / "text.npy").write_text("not an array")
    cub = make_cub(root / "cub", per_class=1)
    labels = (cub / "image_class_labels.txt").read_text().splitlines()
    labels[2] = "3 three"
    (root / "cub_label").mkdir()
    for name in ("images.txt", "images"):
        (root / "cub_label" / name).symlink_to(cub / name)
    (root / "cub_label" / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "cub_binary").mkdir()
    (root / "cub_binary" / "images.txt").write_bytes(b"1 a.jpg\n\xff\xfe\x00binary\n")
    (root / "cub_binary" / "image_class_labels.txt").write_text("1 1\n")
    for name, rows in {"csv_missing": ["path,label", "a.png,1", "b.png"],
                       "csv_label": ["path,label", "a.png,1", "b.png,cat"]}.items():
        (root / name).mkdir()
        (root / name / "images.csv").write_text("\n".join(rows) + "\n")
    (root / "truncated" / "checkpoints").mkdir(parents=True)
    (root / "truncated" / "config.yaml").write_text((run / "config.yaml").read_text())
    data = (run / "checkpoints" / "last.pt").read_bytes()
    (root / "truncated" / "checkpoints" / "last.pt").write_bytes(data[: len(data) // 2])
    (root / "a_file").write_text("x")
    emb = np.load(root / "emb.npz")  # labels (and paths) shorter than its rows
    np.savez(root / "short_labels.npz", embeddings=emb["embeddings"], labels=emb["labels"][:-3],
             paths=emb["paths"][:-3])
    (root / "empty.yaml").write_text("\n")
    import shutil
    shutil.copytree(run, root / "bad_results")
    (root / "bad_results" / "results.json").write_text("{not json")
    full = (root / "emb.npz").read_bytes()
    (root / "truncated.npz").write_bytes(full[: len(full) // 2])
    (root / "twice.yaml").write_text("model:\n  backbone: resnet18\ndata:\n  image_size: 32\n"
                                     "model:\n  backbone: small_cnn\n")
    (root / "tab.yaml").write_text("model:\n\tbackbone: small_cnn\n")
    (root / "flow.yaml").write_text("schedule: {milestones: [1, 2}\n")
    x, y, paths = emb["embeddings"], emb["labels"], emb["paths"]
    nan_row = x.copy()
    nan_row[7] = np.nan
    for name, arrays in {"nan_row": (nan_row, y), "int_rows": ((x * 10).astype(np.int64), y),
                         "float_labels": (x, y + 0.5),
                         "text_labels": (x, np.array([f"c{v}" for v in y]))}.items():
        np.savez(root / f"{name}.npz", embeddings=arrays[0], labels=arrays[1], paths=paths)
    np.save(root / "two_rows.npy", x[:2])
    (root / "query_truncated.npz").write_bytes(full[:100])
    return root


TRAIN = ["train", "--set", "model.backbone=small_cnn", "--set", "run.progress=false"]
CASES = [  # (command with {root} for the fixture's folder, the line's expected fragment)
    ([*TRAIN, "--set", "optimizer.lr=-1"], "optimizer.lr=-1.0 is out of range"),
    ([*TRAIN, "--set", "schedule.epochs=0"], "schedule.epochs=0 is out of range"),
    ([*TRAIN, "--set", "data.image_size=0"], "data.image_size=0 is out of range"),
    ([*TRAIN, "--set", "run.device=tpu"], "run.device='tpu' is out of range"),
    ([*TRAIN, "--set", "run.precision=fp8"], "run.precision='fp8' is out of range"),
    ([*TRAIN, "--set", "loss.args.la=big"], "la must be a number"),
    ([*TRAIN, "--set", "loss.args.la=1e37", "--set", "data.image_size=16", "--set",
      "evaluation.before_training=false", "--out", "{root}/huge_la"],
     "la=1e+37 is too large: it must be below 10000 (a logit scale"),
    ([*TRAIN, "--set", "optimizer.lr=1e30", "--set", "data.image_size=16", "--set",
      "evaluation.before_training=false", "--out", "{root}/huge_lr"],
     "embeddings contain NaN or inf; check the model output (learning rate too high?)"),
    ([*TRAIN, "--resume", "{root}/truncated/checkpoints/last.pt"], "is truncated or corrupt"),
    (["evaluate", "{root}/truncated/checkpoints/last.pt"], "is truncated or corrupt"),
    (["evaluate", "{root}/nowhere"], "not found; pass a run folder"),
    (["data", "summary", "--format", "cub", "{root}/cub_label"],
     "image_class_labels.txt:3: field 2 must be an integer; got 'three'"),
    (["data", "summary", "--format", "cub", "{root}/cub_binary"],
     "images.txt is not a text file"),
    (["data", "summary", "--format", "cub", "{root}/a_file"], "is not a folder"),
    (["data", "summary", "--format", "csv", "{root}/csv_missing"],
     "images.csv:3: no label (every row needs path,label)"),
    (["data", "summary", "--format", "csv", "{root}/csv_label"],
     "images.csv:3: label must be an integer; got 'cat'"),
    (["search", "{root}/emb.npz", "--query-index", "100000"], "--query-index must be in [0, "),
    (["search", "{root}/emb.npz", "--query-index", "-896"], "--query-index must be in [0, "),
    (["search", "{root}/nowhere.npz", "--query-index", "0"], "not found; write one with"),
    (["search", "{root}/nan.npy", "--query-index", "0"], "is not an embeddings file"),
    (["search", "{root}/emb.npz", "--query-embedding", "{root}/text.npy"],
     "cannot read --query-embedding"),
    (["search", "{root}/emb.npz", "--query-embedding", "{root}/nan.npy"], "NaN or inf"),
    (["search", "{root}/emb.npz", "--query-embedding", "{root}/wide.npy"], "query has shape"),
    (["search", "{root}/emb.npz", "--query-index", "0", "-k", "0"], "k must be in [1, "),
    (["search", "{root}/short_labels.npz", "--query-index", "0"],
     "but 893 labels and 893 paths; it is damaged"),
    (["search", "{root}/truncated.npz", "--query-index", "0"],
     "is not an embeddings file from softtriple embed (BadZipFile)"),
    (["neighbours", "{root}/short_labels.npz", "-k", "3", "--out", "{root}/knn.npz"],
     "(896, 8) but 893 labels; it is damaged"),
    (["neighbours", "{root}/truncated.npz", "-k", "3", "--out", "{root}/knn.npz"],
     "is not an embeddings file from softtriple embed (BadZipFile)"),
    (["search", "{root}/emb.npz", "--query-index", "0", "--index", "hnsw", "--probes", "-1"],
     "probes must be an integer >= 1 (or 0 for the index's default); got -1"),
    (["search", "{root}/emb.npz", "--query-index", "0", "--index", "ivf", "--probes", "-5"],
     "probes must be an integer >= 1"),
    (["train", "--config", "{root}/empty.yaml"], "empty.yaml is empty; it must hold a mapping"),
    (["report", "{root}/bad_results"], "results.json is not a results file (JSONDecodeError)"),
    # embeddings files that softtriple embed did not write
    (["search", "{root}/nan_row.npz", "--query-index", "0"],
     "has 1 embedding row(s) with NaN or inf"),
    (["search", "{root}/int_rows.npz", "--query-index", "0"],
     "holds embeddings of type int64, not floats"),
    (["search", "{root}/float_labels.npz", "--query-index", "0"],
     "holds labels of type float64, not integers"),
    (["neighbours", "{root}/text_labels.npz", "-k", "3", "--out", "{root}/never.npz"],
     "holds labels of type <U"),
    (["search", "{root}/emb.npz", "--query-embedding", "{root}/two_rows.npy"],
     "holds an array of shape (2, 8); it must hold one embedding"),
    (["search", "{root}/emb.npz", "--query-embedding", "{root}/query_truncated.npz"],
     "cannot read --query-embedding"),
    # no output over an input or a run folder's own file (test_outputs_never_overwrite_...)
    (["neighbours", "{root}/emb.npz", "-k", "3", "--out", "{root}/emb.npz"],
     "the output {root}/emb.npz is {root}/emb.npz, which this command reads"),
    (["neighbours", "{root}/emb.npz", "-k", "3", "--out", "{root}/run/results.json"],
     "is results.json of the run folder {root}/run; write outside it"),
    (["export", "{root}/run", "--format", "torchscript", "--out",
      "{root}/run/checkpoints/last.pt"], "is checkpoints/last.pt of the run folder {root}/run"),
    (["export", "{root}/run", "--format", "torchscript", "--out", "{root}/run/results"],
     "run/results.json is results.json of the run folder"),  # its preprocessing file
    (["embed", "{root}/run", "--out", "{root}/run/test_embeddings.npz"],
     "is test_embeddings.npz of the run folder"),
    (["embed", "{root}/run", "--out", "{root}/run"],
     "the output {root}/run is {root}/run, which this command reads"),
    (["embed", "{root}/run", "--out", "{root}/cub"], "is a folder; name a file in it"),
    (["embed", "{root}/run", "--out", "{root}/a_file/e.npz"],
     "{root}/a_file is a file; choose another output path"),
    ([*TRAIN, "--set", "data.root=digits", "--out", "{root}/a_file"],
     "the run folder {root}/a_file is a file"),
    # YAML mistakes, with their line
    (["train", "--config", "{root}/twice.yaml"],
     "key 'model' is given twice, on lines 1 and 5; keep one"),
    (["train", "--config", "{root}/tab.yaml"],
     "line 2 column 1: found character '\\t' that cannot start any token; YAML indents with"),
    (["train", "--config", "{root}/flow.yaml"], "flow.yaml is not valid YAML, line 1 column"),
    (["train", "--config", "{root}"], "is a folder; name the YAML file in it"),
    (["serve", "{root}/bad_results", "--port", "8791"],
     "results.json is not a results file (JSONDecodeError)"),
]


@pytest.mark.parametrize(("argv", "fragment"), [
    (["data", "prepare", "nothing"], "invalid choice: 'nothing'"),
    (["serve", "RUN", "--port", "99999"], "--port: must be a number in [1, 65535]; got '99999'"),
    (["serve", "RUN", "--port", "http"], "--port: must be a number in [1, 65535]"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_line(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "--help" in lines[0], lines


def test_serve_refuses_a_port_in_use(world, capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(world / "run"), "--port", str(port)]) == 2
    err = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}" in err.err and "serving" not in err.out


@pytest.mark.parametrize(("command", "fragment"), CASES,
                         ids=[" ".join(c[:1] + c[-2:]) for c, _ in CASES])
def test_bad_command_is_one_line_with_status_2(world, capsys, command, fragment):
    argv = [part.replace("{root}", str(world)) for part in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"softtriple {argv[0]}: error: ")
    assert fragment.replace("{root}", str(world)) in lines[0], lines[0]
    assert "Traceback" not in err


def test_data_root_that_is_a_file_is_one_line(world, capsys, monkeypatch):
    monkeypatch.setenv("SOFTTRIPLE_DATA", str(world / "a_file"))
    assert main(["data", "list"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "SOFTTRIPLE_DATA" in err, err


class _Payload:
    """Unpickling this makes the folder ``marker``: proof that a loader ran foreign code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _hostile_files(root: Path, run: Path, marker: Path) -> list[tuple[list[str], Path]]:
    """(command, file it loads) pairs, the file replaced by a pickle that makes ``marker``."""
    import shutil

    import torch

    cases = []
    raw = root / "raw_run"  # a checkpoint that is a bare pickle
    shutil.copytree(run, raw)
    (raw / "checkpoints" / "last.pt").write_bytes(pickle.dumps({"model": _Payload(marker)}))
    cases.append((["evaluate", str(raw)], raw))
    zipped = root / "zip_run"  # torch's zip format, the pickle inside it
    shutil.copytree(run, zipped)
    torch.save({"model": _Payload(marker), "config": {}}, zipped / "checkpoints" / "last.pt")
    cases.append((["train", "--resume", str(zipped)], zipped))
    cases.append((["report", str(zipped)], zipped))
    weights = root / "weights.pt"
    torch.save({"weight": _Payload(marker)}, weights)
    cases.append((["train", "--set", "model.backbone=small_cnn", "--set",
                   f"model.weights={weights}", "--out", str(root / "w")], weights))
    embeddings = root / "hostile_emb.npz"
    np.savez(embeddings, embeddings=np.ones((3, 8), np.float32), labels=np.arange(3),
             paths=np.array([_Payload(marker)] * 3, dtype=object))
    cases.append((["search", str(embeddings), "--query-index", "0"], embeddings))
    query = root / "hostile_query.npy"
    np.save(query, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    cases.append((["search", str(root / "emb.npz"), "--query-embedding", str(query)], query))
    report_run = root / "npz_run"
    shutil.copytree(run, report_run)
    shutil.copy(embeddings, report_run / "test_embeddings.npz")
    cases.append((["report", str(report_run)], report_run))
    config = root / "hostile.yaml"
    config.write_text(f"run: !!python/object/apply:os.mkdir [{marker}]\n")
    cases.append((["train", "--config", str(config)], config))
    return cases


def test_hostile_pickles_in_every_loaded_file_run_no_code(world, capsys):
    """Checkpoints, weights, embeddings, queries, a run's test embeddings and config files: a
    pickle (or YAML tag) that would run code is refused with one line and status 2."""
    marker = world / "pwned"
    cases = _hostile_files(world, world / "run", marker)
    assert len(cases) == 8
    for command, file in cases:
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "error:" in err and "Traceback" not in err, (command, err)
        assert not marker.exists(), f"{file} ran code"
        if file.name in ("zip_run", "weights.pt"):  # refused, and why: not "truncated"
            assert "holds a pickled Python object (posix.mkdir) that is refused: unpickling " \
                   "it could run any code" in err, err


def test_the_last_vague_messages_say_what_is_wrong(world, capsys, monkeypatch, tmp_path):
    """A tampered checkpoint names its misfitting keys; an unwritable output folder is one line
    before any work; an empty SOFTTRIPLE_KNN_ENGINE means auto; a misspelt variant key is
    named, also when it is the label's."""
    import shutil
    import tempfile

    import torch

    tampered = tmp_path / "tampered"
    shutil.copytree(world / "run", tampered)
    state = torch.load(tampered / "checkpoints" / "last.pt", weights_only=True)
    state["model"]["extra.weight"] = torch.zeros(1)
    state["model"].pop(next(iter(state["model"])))
    torch.save(state, tampered / "checkpoints" / "last.pt")
    assert main(["evaluate", str(tampered)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Missing key(s) in state_dict" in err and \
        'Unexpected key(s) in state_dict: "extra.weight"' in err, err

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")
    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "TemporaryFile", read_only)
        assert main(["export", str(world / "run"), "--format", "torchscript", "--out",
                     str(tmp_path / "model.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"cannot write {tmp_path / 'model.pt'}: {tmp_path} is not writable (Read-only " \
           f"file system)" in err and "\n" not in err, err

    from softtriple.evaluation import knn
    monkeypatch.setenv("SOFTTRIPLE_KNN_ENGINE", "")
    x = np.random.default_rng(0).standard_normal((3000, 64)).astype(np.float32)
    assert knn(x, 3)[1].shape == (3000, 3)

    from softtriple.compare import load_suite
    from softtriple.experiment import ConfigError
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"base: {Path(__file__).parents[1] / 'configs' / 'digits.yaml'}\n"
                     f"out: {tmp_path / 'out'}\nvariants:\n  - {{lable: a}}\n")
    with pytest.raises(ConfigError, match="unknown key.s. lable in variants.0.; valid: label"):
        load_suite(suite)


def test_an_error_in_a_dataloader_worker_is_the_same_one_line(data_root, tmp_path, capsys,
                                                               monkeypatch):
    """An image that broke after its check (same size and mtime, so the check's cache still
    trusts it) fails inside a worker process; the user sees the reader's own line, not the
    worker's traceback."""
    import shutil

    shutil.copytree(data_root / "digits", tmp_path / "digits")  # copy2: sizes and mtimes kept
    monkeypatch.setenv("SOFTTRIPLE_DATA", str(tmp_path))
    for image in (tmp_path / "digits").rglob("*.png"):
        stat = image.stat()
        image.write_bytes(b"\0" * stat.st_size)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    argv = ["train", "--set", "model.backbone=small_cnn", "--set", "data.image_size=16",
            "--set", "data.workers=2", "--set", "run.progress=false", "--out",
            str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "worker" not in err, err
    assert err.startswith("softtriple train: error: ") and ".png" in err, err


def test_outputs_never_overwrite_an_input_or_a_run_file(world, capsys):
    """The rule behind the refusals above: the file a command reads and the run folder's own
    files keep every byte; the refusal comes before any work (and again where the output is
    opened, for callers of the library)."""
    from softtriple.experiment.run_folder import (
        OutputError,
        check_output,
        write_embeddings,
        write_neighbours,
    )

    run = world / "run"
    kept = {path: path.read_bytes() for path in (world / "emb.npz", run / "checkpoints" /
                                                 "last.pt", run / "config.yaml")}
    for argv in (["neighbours", str(world / "emb.npz"), "-k", "3", "--out",
                  str(world / "emb.npz")],
                 ["export", str(run), "--format", "torchscript", "--out",
                  str(run / "checkpoints" / "last.pt")],
                 ["embed", str(run), "--out", str(run / "config.yaml")]):
        assert main(argv) == 2
    capsys.readouterr()
    assert all(path.read_bytes() == data for path, data in kept.items())
    with pytest.raises(OutputError, match="of the run folder"):
        write_embeddings(run / "test_embeddings.npz", np.zeros((1, 2)), np.zeros(1), ["a"])
    with pytest.raises(OutputError, match="which this command reads"):
        write_neighbours(world / "emb.npz", np.zeros((1, 1)), np.zeros((1, 1)),
                         reads=[world / "emb.npz"])
    assert check_output(world / "fresh.npz", [world / "emb.npz"]) == world / "fresh.npz"
    assert check_output(run / "test.npz") == run / "test.npz"  # beside the run's files: fine
    assert all(path.read_bytes() == data for path, data in kept.items())
