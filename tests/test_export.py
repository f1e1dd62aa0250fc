"""softtriple export: TorchScript and ONNX files that run without this package, with any batch
size, equal to the PyTorch embeddings within 1e-4, with their preprocessing beside them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from softtriple.cli import main
from softtriple.export import FORMATS, export, preprocessing_file
from softtriple.inference import load_model
from test_training import tiny


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    from softtriple.training import Trainer

    folder = tmp_path_factory.mktemp("export") / "run"
    Trainer(tiny(folder, "schedule.epochs=1", "evaluation.before_training=false",
                 "evaluation.metrics=[recall]")).train()
    return folder


@pytest.mark.parametrize("fmt", [*FORMATS, "onnx via torchscript"])
def test_export_round_trip_with_any_batch_size(run, tmp_path, fmt, monkeypatch):
    """Each format, and ONNX through each of torch's exporters: torch.export's (torch >= 2.9)
    and the TorchScript-based one that older torch uses (chosen here by hand)."""
    if fmt == "onnx via torchscript":
        import softtriple.export

        monkeypatch.setattr(softtriple.export, "onnx_exporter", lambda: "torchscript")
        fmt = "onnx"
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    record = export(run, fmt, out)
    assert record["max_abs_difference"] <= 1e-4 and record["checked_images"] > 2
    if fmt == "onnx":
        from softtriple.export import onnx_exporter

        assert record["exporter"] == f"torch.onnx ({onnx_exporter()}), torch {torch.__version__}"
    beside = json.loads(preprocessing_file(out).read_text())
    assert beside["image_size"] == 16 and len(beside["mean"]) == len(beside["std"]) == 3
    model, _, _ = load_model(run)
    for batch in (1, 5):  # the trace's example batch was 2
        x = torch.randn(batch, 3, 16, 16)
        expected = model(x).detach().numpy()
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = session.run(None, {"images": x.numpy()})[0]
        else:
            got = torch.jit.load(str(out))(x).detach().numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_export_command_and_its_errors(run, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "differs from PyTorch by at most" in capsys.readouterr().out
    assert out.is_file() and preprocessing_file(out).is_file()
    assert main(["export", str(tmp_path / "nowhere"), "--format", "onnx",
                 "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not found" in err
    assert not (tmp_path / "x.onnx").exists()


def test_the_exported_file_takes_its_recorded_preprocessing(run, tmp_path):
    """A user's own preprocessing, as the JSON beside the file records it (the shorter side
    resized, the centre cropped, pixel / 255, then (x - mean) / std, float32 NCHW), gives the
    file the run's own embedding of a test image (the model normalizes uint8 images itself;
    the exported file takes them normalized)."""
    from PIL import Image
    from torchvision.transforms import v2

    out = tmp_path / "model.pt"
    export(run, "torchscript", out)
    record = json.loads(preprocessing_file(out).read_text())
    with np.load(run / "test_embeddings.npz") as saved:
        path, expected = str(saved["paths"][0]), saved["embeddings"][0]
    size = record["image_size"]
    with Image.open(path) as image:  # resized as a uint8 tensor (PIL's resize rounds apart)
        picture = v2.functional.resize(v2.functional.to_image(image.convert("RGB")),
                                       round(size * 256 / 224),
                                       v2.InterpolationMode(record["interpolation"]))
    pixels = v2.functional.center_crop(picture, size).numpy().astype(np.float32) / 255
    mean, std = (np.float32(record[k]).reshape(3, 1, 1) for k in ("mean", "std"))
    x = (pixels - mean) / std  # (3, S, S)
    got = torch.jit.load(str(out))(torch.from_numpy(x)[None])
    assert record["layout"] == "NCHW float32, RGB"
    np.testing.assert_allclose(got[0].detach().numpy(), expected, atol=1e-4)
