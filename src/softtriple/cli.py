"""The ``softtriple`` command line: train, evaluate, embed, export, search, data, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from softtriple import __version__

EXAMPLES = """examples:
  softtriple data prepare digits
  softtriple train --config configs/digits.yaml --set schedule.epochs=5 --out runs/digits
  softtriple train --resume runs/digits --set schedule.epochs=10
  softtriple evaluate runs/digits --json
  softtriple embed runs/digits --out runs/digits/test.npz
  softtriple search runs/digits/test.npz --query-index 0 -k 5
  softtriple search runs/digits/test.npz --query-index 0 -k 5 --index hnsw
  torchrun --nproc_per_node=2 -m softtriple neighbours runs/digits/test.npz --out knn.npz
  softtriple report runs/digits
  softtriple export runs/digits --format torchscript --out runs/digits/model.pt
  softtriple compare configs/compare/glyphs_head.yaml --dry-run
  torchrun --nproc_per_node=2 -m softtriple train --config configs/digits.yaml
"""


def _print_metrics(metrics: dict[str, Any]) -> None:
    for key, value in metrics.items():
        print(f"  {key:<19}{value:.4f}" if isinstance(value, float) else f"  {key:<19}{value}")


def cmd_train(args: argparse.Namespace) -> int:
    from softtriple import distributed as dist
    from softtriple.experiment import load_config
    from softtriple.experiment.run_folder import RunDir
    from softtriple.training import Trainer

    if args.resume:
        run = Path(args.resume)
        if run.is_file():  # RUN/checkpoints/last.pt: the run folder is two levels up
            run = run.parent.parent
        config = load_config(args.config or RunDir(run).config, args.set)
        config.run.out = str(run)
    else:
        config = load_config(args.config, args.set)
        if args.out:
            config.run.out = args.out
    results = Trainer(config, resume=run if args.resume else None,
                      overwrite=args.overwrite).train()
    if dist.is_main():
        if config.run.report:
            from softtriple.analysis.report import write_report
            write_report(results["run"])
        print(f"run folder: {results['run']}")
        _print_metrics(results["metrics"])
    dist.teardown()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from softtriple.evaluation import evaluate
    from softtriple.experiment.build import resolve_device
    from softtriple.experiment.config import check_clustering_runs_here
    from softtriple.inference import embed_split, load_model

    model, config, _ = load_model(args.checkpoint)
    check_clustering_runs_here(config.evaluation, args.metrics)  # before the embedding
    embeddings, labels, _, _ = embed_split(model, config, args.split)
    on_device = torch.from_numpy(embeddings).to(resolve_device(config.run.device))
    metrics = evaluate(on_device, labels, ks=config.evaluation.ks,
                       metrics=args.metrics or config.evaluation.metrics, seed=config.run.seed,
                       kmeans_settings=config.evaluation.kmeans)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.checkpoint}: {args.split} split, {len(labels)} images")
        _print_metrics(metrics)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from softtriple.experiment.run_folder import check_output, write_embeddings
    from softtriple.inference import embed_split, load_model

    check_output(args.out, [args.checkpoint])  # before the work, and again where it is opened
    model, config, _ = load_model(args.checkpoint)
    embeddings, labels, paths, names = embed_split(model, config, args.split)
    out = write_embeddings(args.out, embeddings, labels, paths, names, reads=[args.checkpoint])
    print(f"wrote {out}: {embeddings.shape[0]} embeddings of width {embeddings.shape[1]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from softtriple.export import export, preprocessing_file

    record = export(args.checkpoint, args.format, args.out)
    print(f"wrote {args.out} ({args.format}) and {preprocessing_file(Path(args.out))}; on "
          f"{record['checked_images']} test images it differs from PyTorch by at most "
          f"{record['max_abs_difference']:.2g}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from softtriple.serve import serve
    except ImportError as error:
        raise ValueError("serve needs fastapi and uvicorn: pip install 'softtriple[serve]'"
                         ) from error
    serve(args.run, args.host, args.port,  # the run is checked and its model loaded first
          ready=lambda: print(f"serving {args.run} on http://{args.host}:{args.port}/ "
                              f"(Ctrl-C stops)", flush=True))
    return 0


def cmd_neighbours(args: argparse.Namespace) -> int:
    import torch

    from softtriple import distributed as dist
    from softtriple.evaluation.metrics import Neighbours, recall_from
    from softtriple.experiment.run_folder import check_output, write_neighbours
    from softtriple.search import file_neighbours

    reads = [args.gallery, *([args.queries] if args.queries else [])]
    check_output(args.out, reads)  # before the search, and again where the file is opened
    dist.setup(torch.device("cpu"))
    found = file_neighbours(args.gallery, args.k, args.queries, args.device)
    if found is not None:
        out = write_neighbours(args.out, found.indices, found.similarities, reads)
        gallery = len(found.query_labels if found.gallery_labels is None else found.gallery_labels)
        print(f"wrote {out}: the {args.k} nearest of {len(found.query_labels)} queries among "
              f"{gallery} items, exact, on {found.processes} process(es)")
        ranked = Neighbours.from_index(found.indices, found.query_labels, found.gallery_labels)
        _print_metrics({f"recall@{k}": v
                        for k, v in recall_from(ranked, sorted({1, args.k})).items()})
    dist.teardown()
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from softtriple.search import EmbeddingIndex

    index = EmbeddingIndex.load(args.embeddings, args.index, args.probes)
    if args.index != "flat":
        recall = index.recall_against_exact(args.k)
        print(f"index: {index.backend}; recall of the exact top-{args.k}: {recall:.3f} "
              f"(on up to 1,000 items of the file)")
    if args.query_index is not None:
        if not 0 <= args.query_index < len(index.paths):
            raise ValueError(f"--query-index must be in [0, {len(index.paths) - 1}]; got "
                             f"{args.query_index}")
        query, exclude = index.embeddings[args.query_index], args.query_index
        print(f"query: #{args.query_index} {index.paths[args.query_index]}")
    elif args.query_embedding:
        query, exclude = _query_embedding(args.query_embedding), None
    else:
        if not args.checkpoint:
            raise ValueError("--image needs --checkpoint, the model that made the embeddings")
        query, exclude = index.embed_image(args.checkpoint, args.image), None
        print(f"query: {args.image}")
    for rank, (i, score) in enumerate(index.search(query, args.k, exclude=exclude), 1):
        print(f"{rank:>3}  {score:.4f}  class {index.label_text(i):>5}  {index.paths[i]}")
    return 0


def _query_embedding(path: str) -> Any:
    """The one embedding (d,) in a .npy file (or in a 1-row .npz embeddings file)."""
    import zipfile

    import numpy as np
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                loaded = loaded["embeddings"] if "embeddings" in loaded.files else \
                    loaded[loaded.files[0]]
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot read --query-embedding {path}: a .npy file with one embedding "
                         f"({error.__class__.__name__})") from error
    array = np.asarray(loaded)
    if array.ndim != 1 and not (array.ndim == 2 and array.shape[0] == 1):
        raise ValueError(f"--query-embedding {path} holds an array of shape {array.shape}; it "
                         f"must hold one embedding, (d,) or (1, d)")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"--query-embedding {path} holds {array.dtype} values; it must hold "
                         f"floats")
    return array.reshape(-1)


def cmd_data(args: argparse.Namespace) -> int:
    from softtriple.data import read_table
    from softtriple.data.builtin import BUILTINS, default_root, prepare, prepared

    root = Path(args.root) if getattr(args, "root", None) else default_root()
    if args.data_command == "summary":
        from softtriple.data.checks import bad_images

        table = read_table(args.format, args.path)
        summary = table.summary()
        bad = bad_images(table)
        summary["unreadable_images"] = [f"{p} ({why})" for p, why in bad]
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"{args.format} data at {table.root}")
            for split, row in summary.items():
                if split == "unreadable_images":
                    continue
                print(f"  {split:<6}{row['images']:>8} images {row['classes']:>7} classes   "
                      f"per class min {row['min_per_class']} median "
                      f"{row['median_per_class']:g} max {row['max_per_class']}")
                if row["single_image_classes"]:
                    print(f"        {row['single_image_classes']} class(es) have one image: "
                          f"kept for training, but as queries they have no positive")
            if bad:
                print(f"  {len(bad)} unreadable image(s), e.g. {bad[0][0]} ({bad[0][1]}); "
                      f"training refuses them unless data.bad_images=skip")
    elif args.data_command == "prepare":
        folder = prepare(args.name, root, force=args.force)
        made = prepared(args.name, root) or {}
        print(f"{args.name}: {made.get('images')} images, {made.get('classes')} classes "
              f"in {folder}")
    else:
        for name, builtin in BUILTINS.items():
            where = str(root / name) if prepared(name, root) else "not prepared"
            print(f"  {name:<15}{where:<50}{builtin.description}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from softtriple.analysis.report import write_report

    print(f"wrote {write_report(args.run)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from softtriple import compare

    suite = compare.load_suite(args.suite)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1; got {args.jobs}")
    if args.dry_run:
        width = max(len(variant.label) for variant in suite.variants) + 2
        for run in compare.runs(suite):
            print(f"{run.status:<8}{run.variant.label:<{width}}seed {run.seed:<4}{run.folder}")
            if args.verbose:
                print("        " + " ".join(compare.train_command(suite, run, 0)[3:]))
        return 0
    if args.carry:
        carried, skipped = compare.carry(suite, args.carry)
        print(f"carried {carried} finished run(s) from {args.carry}"
              + "".join(f"\n  not carried: {line}" for line in skipped))
    failures = [] if args.summarize_only else compare.run_suite(suite, args.jobs)
    summary = compare.summarize(suite)
    print(f"wrote {suite.out / 'summary.md'}, summary.json and plots/ "
          f"({len(summary['runs'])} finished runs)")
    print(compare.summary_markdown(summary))
    for failure in failures:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from softtriple import demo

    return demo.main(args.set)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (its own prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a number in [1, 65535]; got {text!r}")
    return port


def build_parser() -> argparse.ArgumentParser:
    from softtriple.names import BUILTIN_DATASETS, DATA_FORMATS, EXPORT_FORMATS

    parser = OneLineParser(
        prog="softtriple", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Deep metric learning with the SoftTriple loss (Qian et al., ICCV 2019): "
                    "train embedding models, evaluate retrieval on held-out classes, embed and "
                    "search images.")
    parser.add_argument("--version", action="version", version=f"softtriple {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train an embedding model (single process or under torchrun)",
        description="Train an embedding model with a metric-learning loss and evaluate it on the "
                    "held-out classes. Settings come from the defaults, then --config, then each "
                    "--set in order. Under torchrun (one machine or several) every process "
                    "takes a block of each global batch (DistributedDataParallel; gloo on CPU, "
                    "nccl on GPU) and every loss optimizes what it does in one process; "
                    "--set loss.shard_centers=true gives each process only its block of "
                    "SoftTriple's centers, for very many classes (docs/DISTRIBUTED.md).")
    train.add_argument("--config", help="YAML file of settings (see configs/)")
    train.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override settings, e.g. --set loss.name=proxy_nca "
                            "schedule.epochs=5 (repeatable; later ones win)")
    train.add_argument("--out", help="run folder (default: run.out, runs/latest)")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in a run folder that already holds a run (deletes it)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR from its last completed epoch; the config must be "
                            "the run's own (only epochs, workers, progress and when and how "
                            "it evaluates, evaluation.every/ks/metrics/kmeans, may change)")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "evaluate", help="evaluate a checkpoint on its data set's held-out classes",
        description="Embed the test split of the checkpoint's data set and print Recall@K, "
                    "MAP@R, NMI and the other configured metrics.")
    evaluate.add_argument("checkpoint", help="a run folder or a .pt checkpoint")
    evaluate.add_argument("--split", default="test", choices=("train", "test"))
    evaluate.add_argument("--metrics", nargs="+", help="override evaluation.metrics")
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    evaluate.set_defaults(func=cmd_evaluate)

    embed = commands.add_parser(
        "embed", help="write the embeddings of a split to a .npz file",
        description="Embed every image of a split with a checkpoint's model; the .npz holds "
                    "embeddings (N, d), labels (N,) and paths (N,).")
    embed.add_argument("checkpoint", help="a run folder or a .pt checkpoint")
    embed.add_argument("--out", required=True, help="output .npz file")
    embed.add_argument("--split", default="test", choices=("train", "test"))
    embed.set_defaults(func=cmd_embed)

    export = commands.add_parser(
        "export", help="the embedding model as a TorchScript or ONNX file",
        description="Write the trained embedding model (backbone, head, normalization) as a file "
                    "that runs without this package, with a dynamic batch size, and its "
                    "preprocessing (size, mean, std) as FILE.json beside it. The export is "
                    "checked on the run's test images against PyTorch (max abs difference "
                    "<= 1e-4) and removed if it differs. ONNX needs the 'export' extra.")
    export.add_argument("checkpoint", help="a run folder or a .pt checkpoint")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    export.add_argument("--out", required=True, help="output file (e.g. model.onnx, model.pt)")
    export.set_defaults(func=cmd_export)

    serve = commands.add_parser(
        "serve", help="a search page over a finished run, in the browser",
        description="Start a web page (FastAPI, uvicorn) over RUN_DIR's held-out embeddings: "
                    "pick a held-out image or upload one and see its nearest neighbours (green: "
                    "same class, red: another) with their similarity and label, and the run's "
                    "metrics and plots. Listens on 127.0.0.1 unless --host says otherwise; "
                    "stop it with Ctrl-C. Needs the 'serve' extra.")
    serve.add_argument("run", metavar="RUN_DIR", help="a finished run folder")
    serve.add_argument("--port", type=port_number, default=8000, help="port (default 8000)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1, this machine only)")
    serve.set_defaults(func=cmd_serve)

    search = commands.add_parser(
        "search", help="nearest neighbours of a query among embedded images (faiss)",
        description="Build a faiss inner-product index over an embeddings file from "
                    "'softtriple embed' and print the top-k images for a query: an item of the "
                    "file, an embedding (.npy), or an image embedded with --checkpoint.")
    search.add_argument("embeddings", help=".npz written by softtriple embed")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--query-index", type=int, help="use item i of the file as the query")
    query.add_argument("--query-embedding", help=".npy file with one embedding")
    query.add_argument("--image", help="an image file, embedded with --checkpoint")
    search.add_argument("--checkpoint", help="the model that made the embeddings (for --image)")
    search.add_argument("-k", type=int, default=8, help="neighbours to show (default 8)")
    search.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat",
                        help="flat: exact (default); ivf or hnsw: approximate faiss indexes for "
                             "large galleries, with their recall against the exact search")
    search.add_argument("--probes", type=int, default=0,
                        help="IVF cells searched (nprobe) or HNSW search breadth (efSearch); "
                             "0: a default (nlist/8, 64)")
    search.set_defaults(func=cmd_search)

    neighbours = commands.add_parser(
        "neighbours", help="exact k nearest neighbours of every item (sharded under torchrun)",
        description="The exact k nearest neighbours (cosine) of every query among a gallery, "
                    "both embeddings files from 'softtriple embed'; without --queries, of every "
                    "gallery item among the others. Under torchrun each process memory-maps "
                    "only its shard of the files and the queries go round "
                    "(softtriple.evaluation.sharded_search), so the gallery may exceed one "
                    "process's memory. Writes indices and similarities (N, k) to --out and prints "
                    "Recall@1 and Recall@k by the files' labels.",
        epilog="example:\n  softtriple neighbours runs/digits/test.npz -k 5 --out "
               "runs/digits/knn.npz", formatter_class=argparse.RawDescriptionHelpFormatter)
    neighbours.add_argument("gallery", help="embeddings file (.npz) to search")
    neighbours.add_argument("--queries", help="embeddings file of the queries (default: the "
                                              "gallery, each item leaving itself out)")
    neighbours.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    neighbours.add_argument("--out", required=True, help="where to write the neighbours (.npz)")
    neighbours.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                            help="where one process searches (default auto: a GPU where one is "
                                 "visible); under torchrun the processes search on the CPU")
    neighbours.set_defaults(func=cmd_neighbours)

    report = commands.add_parser(
        "report", help="plots and an HTML report of a finished run",
        description="Write RUN_DIR/plots/ (training curves, a retrieval gallery, an embedding "
                    "map, effective centers and the images each center attracts) and "
                    "RUN_DIR/report.html, a static page that opens from disk. train runs this "
                    "at its end unless run.report is false.")
    report.add_argument("run", metavar="RUN_DIR", help="a run folder written by softtriple train")
    report.set_defaults(func=cmd_report)

    data = commands.add_parser("data", help="inspect data sets and build the built-in ones",
                               description="Summaries of data sets on disk and the built-in "
                                           "data sets made offline from installed packages.")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    summary = data_commands.add_parser(
        "summary", help="images and classes per split of a data set on disk",
        description="Read a data set in one of the known formats and print, per split, the "
                    "images, classes and images per class.")
    summary.add_argument("--format", required=True,
                         choices=DATA_FORMATS)
    summary.add_argument("path", help="the data set's root folder (or CSV file)")
    summary.add_argument("--json", action="store_true", help="print JSON")
    prepare_parser = data_commands.add_parser(
        "prepare", help="build a built-in data set", description="Build a built-in data set "
        "into ROOT/NAME (image folders and manifest.json); does nothing when it is up to date.")
    prepare_parser.add_argument("name", choices=BUILTIN_DATASETS, metavar="NAME",
                                help=f"one of {', '.join(BUILTIN_DATASETS)}")
    prepare_parser.add_argument("--root", help="where data sets live ($SOFTTRIPLE_DATA or ./data)")
    prepare_parser.add_argument("--force", action="store_true", help="rebuild")
    listing = data_commands.add_parser("list", help="built-in data sets and where they are",
                                       description="List the built-in data sets.")
    listing.add_argument("--root", help="where data sets live ($SOFTTRIPLE_DATA or ./data)")
    data.set_defaults(func=cmd_data)

    compare_parser = commands.add_parser(
        "compare", help="run a suite of runs (variants x seeds) and summarize it",
        description="Train every (variant, seed) of a suite file as a run folder under the "
                    "suite's out folder, skipping finished runs and resuming interrupted ones, "
                    "then write summary.json, summary.md (mean +- std over seeds, the best in "
                    "bold) and plots/. Rerunning a finished suite only summarizes it again.",
        epilog="examples:\n  softtriple compare configs/compare/glyphs_head.yaml --dry-run\n"
               "  softtriple compare configs/compare/glyphs_head.yaml --summarize-only\n"
               "  (then without --summarize-only, --jobs 2: the whole suite, about an hour)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    compare_parser.add_argument("suite", help="a suite YAML file (see configs/compare/)")
    compare_parser.add_argument("--jobs", type=int, default=1,
                                help="runs at a time, each with cores/jobs threads (default 1)")
    compare_parser.add_argument("--dry-run", action="store_true",
                                help="list the runs and their status (new, partial, done)")
    compare_parser.add_argument("--verbose", action="store_true",
                                help="with --dry-run, print each run's train arguments")
    compare_parser.add_argument("--summarize-only", action="store_true",
                                help="train nothing; summarize the finished runs")
    compare_parser.add_argument("--carry", metavar="SUMMARY",
                                help="first take the finished runs of an earlier summary of "
                                     "this suite (e.g. benchmarks/results/compare/NAME.json, "
                                     "from another checkout) whose settings match; train the "
                                     "rest")
    compare_parser.set_defaults(func=cmd_compare)

    demo = commands.add_parser(
        "demo", help="the main job: fine-tune EfficientNet-Lite0 with SoftTriple on glyphs",
        description="Prepare the built-in glyphs data set, fine-tune the ImageNet-pretrained "
                    "EfficientNet-Lite0 with SoftTripleLoss on 300 characters (about 3 minutes "
                    "on 2 CPU cores) and print Recall@1/2/4/8, MAP@R and NMI on 300 held-out "
                    "characters: raw pixels, pretrained features, and after training. The "
                    "settings are configs/glyphs.yaml's.")
    demo.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="override settings, e.g. --set schedule.epochs=2 "
                           "run.device=cpu (repeatable; later ones win)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
        sys.stderr.close()
        return 0
    except (ValueError, FloatingPointError) as error:  # our one-line errors: no traceback
        print(f"softtriple {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # the system refused a file: its reason and the file, one line
        where = f": {error.filename}" if error.filename else ""
        print(f"softtriple {args.command}: error: {error.strerror or error}{where}",
              file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """The error's own message on one line. An error raised in a DataLoader worker process comes
    back with the worker's traceback as its message; its last line holds the original
    ``Type: message``, whose message is what the main process would have said."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
