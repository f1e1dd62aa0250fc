"""Export a trained embedding model (backbone, head, normalization) as a file another program
runs without this package: TorchScript (``torch.jit.load``) or ONNX (onnxruntime), with a
dynamic batch size. The preprocessing (image size, mean, std) goes beside it in a small JSON,
and the export is checked by running it on the run's own test images against PyTorch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from softtriple.atomic import atomic_path, write_json
from softtriple.data import normalize_images
from softtriple.experiment.config import Config
from softtriple.experiment.run_folder import check_output
from softtriple.inference import load_model, split_dataset
from softtriple.models import EmbeddingModel

FORMATS = ("torchscript", "onnx")
TOLERANCE = 1e-4  # max abs difference from the PyTorch embeddings, float32
CHECK_IMAGES = 64  # test images the check runs on


class ExportError(ValueError):
    """An export failed, or its output does not match the PyTorch model."""


def preprocessing_file(model_file: Path) -> Path:
    """model.onnx -> model.onnx.json (the preprocessing beside the model)."""
    return model_file.with_name(model_file.name + ".json")


def _check_images(model: EmbeddingModel, config: Config) -> torch.Tensor:
    """Up to CHECK_IMAGES test images (n, 3, S, S) float32, preprocessed as the run's evaluation
    is and normalized as the exported file's input is (the model normalizes uint8 images itself;
    the file takes them normalized, as its preprocessing JSON says)."""
    dataset, _ = split_dataset(model, config, "test")
    subset = Subset(dataset, range(min(CHECK_IMAGES, len(dataset))))
    images = torch.cat([images for images, _, _ in DataLoader(subset, batch_size=CHECK_IMAGES)])
    return normalize_images(images, model.mean, model.std)


def _torchscript(model: EmbeddingModel, example: torch.Tensor, out: Path) -> Any:
    with warnings.catch_warnings():  # TorchScript's own deprecation notice, once per call:
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the format is what was
        warnings.simplefilter("ignore", FutureWarning)  # asked for; the check below runs it
        traced = torch.jit.trace(model, example)
        with atomic_path(out) as tmp:
            traced.save(str(tmp))
        loaded = torch.jit.load(str(out))
    return lambda x: loaded(torch.from_numpy(x)).detach().numpy()


def onnx_exporter() -> str:
    """Which of torch's ONNX exporters ``--format onnx`` uses: torch.export's ("dynamo"), its
    default since torch 2.9, or before 2.9 the TorchScript-based one ("torchscript"): torch 2.6's
    dynamo exporter failed with the onnxscript and onnx a fresh install brings (a batch norm it
    could not translate, then an attribute onnx refused), and pinning them to torch's age is
    not something an extra can say."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return "dynamo" if (major, minor) >= (2, 9) else "torchscript"


def _onnx(model: EmbeddingModel, example: torch.Tensor, out: Path) -> Any:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as error:
        raise ExportError("--format onnx needs onnx, onnxscript and onnxruntime: "
                          "pip install 'softtriple[export]'") from error
    names: dict[str, Any] = {"input_names": ["images"], "output_names": ["embeddings"],
                             "verbose": False}
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if onnx_exporter() == "dynamo":
            torch.onnx.export(model, (example,), str(tmp), **names, dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                              external_data=False)
        else:
            torch.onnx.export(model, (example,), str(tmp), **names, dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


def export(run: str | Path, fmt: str, out: str | Path) -> dict[str, Any]:
    """Export the model of ``run`` (a run folder or checkpoint) to ``out`` in ``fmt``; write the
    preprocessing JSON beside it; check the file on the run's test images.

    Returns:
        The preprocessing record, with ``"max_abs_difference"`` and ``"checked_images"``.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    check_output(preprocessing_file(check_output(out, [run])), [run])
    model, config, _ = load_model(run)
    model = model.float().cpu().eval()
    images = _check_images(model, config)
    out = Path(out)
    try:
        run_file = (_torchscript if fmt == "torchscript" else _onnx)(model, images[:2], out)
    except ExportError:
        raise
    except Exception as error:  # the exporters raise many types
        raise ExportError(f"exporting {run} to {fmt} failed: {error}".splitlines()[0]) from error
    with torch.no_grad():
        expected = model(images).numpy()
    got = np.asarray(run_file(np.ascontiguousarray(images.numpy())))
    difference = float(np.abs(got - expected).max())
    if got.shape != expected.shape or not difference <= TOLERANCE:
        out.unlink(missing_ok=True)
        raise ExportError(f"the {fmt} file's embeddings differ from PyTorch's by {difference:g} "
                          f"(allowed {TOLERANCE:g}); nothing was kept")
    record = {"format": fmt, "model": out.name,
              **({"exporter": f"torch.onnx ({onnx_exporter()}), torch {torch.__version__}"}
                 if fmt == "onnx" else {}), "input": "images", "output": "embeddings",
              "layout": "NCHW float32, RGB", "image_size": config.data.image_size,
              "resize": "shorter side to round(image_size * 256 / 224), center crop image_size",
              "interpolation": model.interpolation,  # a bicubic resize of bilinear weights
              # (Pillow's default) loses 1-2% cosine
              "scale": "pixel values / 255, then (x - mean) / std per channel",
              "mean": list(model.mean), "std": list(model.std),
              "embedding_dim": config.model.embedding_dim,
              "normalized": config.model.normalize, "run": str(run),
              "max_abs_difference": difference, "checked_images": len(images)}
    write_json(preprocessing_file(out), record)
    return record

