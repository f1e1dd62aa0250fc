"""The registries' names that the command line offers as choices, importable without torch so
that ``softtriple --help`` and argument errors answer at once. tests/test_structure.py keeps each
equal to its registry."""

BUILTIN_DATASETS = ("digits", "emoji", "fashion-mnist", "fonts", "glyphs")  # data.builtin
DATA_FORMATS = ("builtin", "cars", "csv", "cub", "folder", "sop")  # data.formats.FORMATS
EXPORT_FORMATS = ("torchscript", "onnx")  # export.FORMATS
