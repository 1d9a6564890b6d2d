"""Command line: ``python -m cxrlib <command> ...`` (also installed as ``cxrlib``).

Commands:
  phantom   write a phantom chest X-ray cohort (images, masks, manifest.csv)
  pipeline  run the numbered notebooks in order with papermill
  results   write a run's results page from its metrics (or from a saved summary.json)
  compare   the headline metrics and claims of several runs side by side
  data      list known public datasets (data list), fetch the open ones (data download), find
            re-published copies of films across folders or manifests (data copies)
  reader    the reader study as a web app (reader prepare / serve / link / export)
  docs      regenerate docs/references.md from the adapters' metadata (docs references)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_phantom(args: argparse.Namespace) -> int:
    from cxrlib.data.phantom import CohortConfig, write_cohort

    cohort = CohortConfig(
        n_patients=args.patients,
        seed=args.seed,
        size=args.size,
        site_label_correlation=args.site_label_correlation,
        text=not args.no_text,
    )
    manifest = write_cohort(args.out, cohort, progress=not args.quiet)
    counts = manifest["label"].value_counts().to_dict()
    print(
        f"wrote {len(manifest)} images of {manifest['patient_id'].nunique()} patients "
        f"to {args.out} ({counts}); manifest: {args.out}/manifest.csv"
    )
    return 0


def _parameter(text: str) -> tuple[str, object]:
    """``NAME=VALUE`` -> ``(NAME, value)``; VALUE as a Python literal (``3``, ``0.5``, ``True``) or a string."""
    import ast

    name, sep, value = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        parsed: object = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return name.strip(), parsed


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from cxrlib.pipeline import PipelineError, print_outputs, run_pipeline

    try:
        result = run_pipeline(
            dataset=args.dataset,
            profile=args.profile,
            run_dir=args.run_dir,
            seed=args.seed,
            device=args.device,
            notebooks=args.notebooks or None,
            extra_params=dict(args.param or []),
            progress=not args.quiet,
        )
    except PipelineError as exc:
        print(f"pipeline failed: {exc}", file=sys.stderr)
        return 1
    print_outputs(result)
    return 0


#: Exit status of ``data download`` for a source that must be downloaded by hand.
EXIT_MANUAL = 3


def _cmd_data_list(args: argparse.Namespace) -> int:
    from cxrlib.data.download import describe_sources

    print(describe_sources())
    print("\nFetch a direct one with: python -m cxrlib data download NAME --to DIR; "
          "for a manual one the same command prints where to get it and where to put it.")
    return 0


def _cmd_data_download(args: argparse.Namespace) -> int:
    from cxrlib.config import data_dir
    from cxrlib.data.download import DownloadError, ManualDownloadRequired, download

    to = args.to if args.to is not None else data_dir()
    log = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))
    try:
        result = download(args.source, to, keep_archive=args.keep_archive, progress=not args.quiet,
                          timeout=args.timeout, log=log)
    except ManualDownloadRequired as exc:
        print(exc, file=sys.stderr)
        return EXIT_MANUAL
    except ValueError:
        raise  # bad input (unknown source, refused archive): main() prints it, exit status 2
    except (DownloadError, FileExistsError) as exc:
        print(f"download failed: {exc}", file=sys.stderr)
        return 1
    for entry in result.files:
        checked = "matches the published checksum" if entry["checksum_checked"] else "no published checksum"
        print(f"{entry['file']}: {entry['bytes']} bytes, SHA-256 {entry['sha256']} ({checked})")
    for folder in result.folders:
        print(folder)
    if result.record is not None:
        print(f"record: {result.record}")
    return 0


def _cmd_data_copies(args: argparse.Namespace) -> int:
    from cxrlib.data.copies import CopySettings, copies_across, write_pairs

    chosen = {"min_correlation": args.min_correlation, "min_tight_share": args.min_tight_share}
    settings = CopySettings(k=args.k, **{name: value for name, value in chosen.items() if value is not None})
    result = copies_across(args.inputs, settings, progress=not args.quiet, workers=args.workers)
    out = write_pairs(result, args.out)
    where = "across the inputs" if len(args.inputs) > 1 else "within the input"
    print(f"{len(result.pairs)} pairs examined {where}, {int(result.pairs['copy'].sum())} copies; "
          f"wrote {out}")
    if result.report.bad:
        print(result.report, file=sys.stderr)
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from cxrlib.references import references_differ, write_references

    if args.check:
        problem = references_differ()
        print(problem or "docs/references.md is up to date", file=sys.stderr if problem else sys.stdout)
        return 1 if problem else 0
    print(f"wrote {write_references()}")
    return 0


def _cmd_reader_prepare(args: argparse.Namespace) -> int:
    from cxrlib.reader_web import prepare_from_run

    try:
        out = prepare_from_run(args.run, args.out, n_images=args.images, seed=args.seed, session=args.session,
                               image_size=args.image_size, display_size=args.display_size,
                               allowed_roots=args.allow_root)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        hint = " (--allow-root FOLDER trusts a data folder)" if "outside the allowed folders" in str(exc) else ""
        print(f"reader prepare failed: {exc}{hint}", file=sys.stderr)
        return 1
    print(f"study folder ready: {out}; serve it with: python -m cxrlib reader serve --study {out}")
    return 0


def _cmd_reader_serve(args: argparse.Namespace) -> int:
    from cxrlib.reader_web import serve

    try:
        serve(args.study, host=args.host or ("0.0.0.0" if args.expose else "127.0.0.1"), port=args.port,
              expose=args.expose, new_token=args.new_token)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"reader serve failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_reader_link(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from cxrlib.reader_web import ReaderStudy, study_token

    try:
        study = ReaderStudy(args.study)
        key = study.reissue(args.reader)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"reader link failed: {exc}", file=sys.stderr)
        return 1
    print(f"http://{args.host}:{args.port}/?token={study_token(study.folder)}"
          f"#reader={quote(args.reader)}&key={quote(key)}")
    return 0


def _cmd_reader_export(args: argparse.Namespace) -> int:
    from cxrlib.reader_study import collect_answers, score_table
    from cxrlib.reader_web import export_answers

    try:
        copied = export_answers(args.study, args.to)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"reader export failed: {exc}", file=sys.stderr)
        return 1
    print(f"copied {len(copied)} answer file(s) to {args.to}")
    answers, problems = collect_answers(args.to)
    for problem in problems:
        print(f"unreadable: {problem}", file=sys.stderr)
    if len(answers):
        print(score_table(answers).round(3).to_string(index=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxrlib", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from cxrlib import __version__
    parser.add_argument("--version", action="version", version=f"cxrlib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a phantom chest X-ray cohort")
    p.add_argument("--out", required=True, help="output folder (images/, masks/<kind>/, manifest.csv)")
    p.add_argument("--patients", type=int, default=60, help="number of patients (1-4 images each)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same cohort")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--site-label-correlation", type=float, default=0.0,
                   help="0: acquisition site independent of label; 1: each class from its own site "
                        "(a shortcut a classifier can learn)")
    p.add_argument("--no-text", action="store_true", help="do not burn text and side markers into images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("pipeline", help="run the numbered notebooks with papermill")
    p.add_argument("--dataset", default="phantom",
                   help="'phantom' or a real-data recipe name / path (see docs/data.md)")
    p.add_argument("--profile", default="default",
                   help="run size: quick (CI smoke), default (CPU demo), full (GPU), real-cpu "
                        "(override files in cxrlib/profiles/; docs/profiles.md)")
    p.add_argument("--run-dir", default=None,
                   help="where executed notebooks and artifacts go (default: $CXR_RUNS_DIR/<dataset>-<profile>)")
    p.add_argument("--seed", type=int, default=0, help="seed passed to every notebook")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--notebooks", nargs="*", default=None,
                   help="only these notebooks (prefix or stem, e.g. 01 02), in pipeline order")
    p.add_argument("--param", action="append", type=_parameter, metavar="NAME=VALUE",
                   help="set a notebook parameter (it beats the profile's value and reaches only the notebooks "
                        "that declare it), e.g. "
                        "--param SEG_DATA=/data/COVID-19_Radiography_Dataset (repeatable; VALUE is "
                        "read as a Python literal when it is one, else as a string)")
    p.add_argument("--quiet", action="store_true", help="no per-cell progress bar")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("data", help="list public datasets and download the open ones")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("list", help="known sources and how to get each")
    q.set_defaults(func=_cmd_data_list)
    q = data_sub.add_parser(
        "download", help="fetch, check and unpack a source (exit status 3: download it by hand)")
    q.add_argument("source", help="source name, see 'python -m cxrlib data list'")
    q.add_argument("--to", default=None,
                   help="download folder (default: $CXR_DATA_DIR, i.e. <project>/data); an archive "
                        "already there is used instead of downloading")
    q.add_argument("--keep-archive", action="store_true", help="keep the archive after unpacking")
    q.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server")
    q.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    q.set_defaults(func=_cmd_data_download)
    q = data_sub.add_parser(
        "copies", help="find the same films across image folders / manifests (re-published copies)")
    q.add_argument("inputs", nargs="+", help="image folders or manifests (.csv/.parquet with a path "
                                             "column); two or more: pairs across them, one: within it")
    q.add_argument("--out", required=True, help="CSV: one row per examined pair, with evidence and 'copy'")
    q.add_argument("--min-correlation", type=float, default=None,
                   help="band-pass correlation from which an aligned pair is a copy (default: CopySettings)")
    q.add_argument("--min-tight-share", type=float, default=None,
                   help="share of keypoint matches the map must fit tightly (default: CopySettings)")
    q.add_argument("--k", type=int, default=5, help="candidate partners examined per image")
    q.add_argument("--workers", type=int, default=None,
                   help="threads describing images (default: the cores this process may use)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_data_copies)

    p = sub.add_parser("docs", help="regenerate a generated docs page (docs/references.md)")
    p.add_argument("page", choices=["references"], help="references: works, datasets, licenses")
    p.add_argument("--check", action="store_true", help="only compare; exit status 1 if it differs")
    p.set_defaults(func=_cmd_docs)
    p = sub.add_parser("reader", help="the reader study as a web app: prepare, serve, link, export")
    reader_sub = p.add_subparsers(dest="reader_command", required=True)
    q = reader_sub.add_parser("prepare", help="make a self-contained study folder from a finished run")
    q.add_argument("--run", required=True, help="run folder (or its notebook 06 folder) of a finished notebook 06")
    q.add_argument("--out", required=True, help="new study folder (images under opaque names, study.json)")
    q.add_argument("--images", type=int, default=None, help="images per reader (default: READER_IMAGES of the run)")
    q.add_argument("--seed", type=int, default=None, help="sequence seed (default: SEED of the run)")
    q.add_argument("--session", default=None, help="session name (default: READER_SESSION of the run)")
    q.add_argument("--image-size", type=int, default=None,
                   help="side every image is shrunk to before display (default: IMAGE_SIZE of the run)")
    q.add_argument("--display-size", type=int, default=256, help="side of the images shown")
    q.add_argument("--allow-root", action="append", default=[], metavar="FOLDER",
                   help="data folder outside the run and data/ that the run's manifest may point into "
                        "(repeatable; e.g. the DATA_ROOT of a real-data run)")
    q.set_defaults(func=_cmd_reader_prepare)
    q = reader_sub.add_parser("serve", help="serve a study folder to readers' browsers")
    q.add_argument("--study", required=True, help="study folder made by 'reader prepare'")
    q.add_argument("--port", type=int, default=8866, help="port (0: any free port)")
    q.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; 0.0.0.0 with --expose)")
    q.add_argument("--expose", action="store_true",
                   help="allow serving on interfaces other than loopback (anyone with the link can read)")
    q.add_argument("--new-token", action="store_true", help="replace the study's link secret (old links stop)")
    q.set_defaults(func=_cmd_reader_serve)
    q = reader_sub.add_parser("link", help="a new personal link for a reader who lost theirs")
    q.add_argument("--study", required=True, help="study folder")
    q.add_argument("--reader", required=True, help="reader name")
    q.add_argument("--host", default="127.0.0.1", help="host name readers reach the server by")
    q.add_argument("--port", type=int, default=8866, help="port the server listens on")
    q.set_defaults(func=_cmd_reader_link)
    q = reader_sub.add_parser("export", help="copy every reader's answers to a folder notebook 06 reads")
    q.add_argument("--study", required=True, help="study folder")
    q.add_argument("--to", required=True, help="e.g. RUN_DIR/<notebook 06 folder>/reader_study")
    q.set_defaults(func=_cmd_reader_export)

    p = sub.add_parser("results", help="write a run's results page (results.md) from its metrics, or from a summary")
    p.add_argument("run", help="a run folder, or a summary.json written by an earlier run")
    p.add_argument("--out", default=None, help="where to write the page (default: RUN/results.md)")
    p.add_argument("--rerun", action="append", default=[], metavar="RUN",
                   help="a rerun of the same profile (folder or summary.json): the page adds whether each claim "
                        "holds in it (repeatable)")
    p.add_argument("--note", action="append", default=[], type=_parameter, metavar="RUN=TEXT",
                   help="how a run was made (load, threads), shown next to it (repeatable)")
    p.add_argument("--readme", default=None, metavar="README",
                   help="also rewrite the held-out-site table between README's external-table markers from RUN")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("compare", help="every headline metric and claim of two or more runs side by side")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders or their summary.json files")
    p.set_defaults(func=_cmd_compare)
    return parser


def _cmd_results(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cxrlib import results, runs

    sources = [Path(args.run), *(Path(run) for run in args.rerun)]
    missing = [str(source) for source in sources if not source.exists()]
    if missing:
        raise ValueError(f"no such run folder or summary file: {', '.join(missing)}")
    source = sources[0]
    if source.is_dir() and args.out is None and not args.rerun:
        print(results.write_results(source))
        if args.readme:
            results.update_readme(args.readme, source / results.SUMMARY)
            print(args.readme)
        return 0
    text = results.render_page(source, sources[1:], notes={name: str(note) for name, note in args.note})
    out = Path(args.out) if args.out else (source / results.RESULTS if source.is_dir()
                                           else source.with_name(results.RESULTS))
    runs.atomic_write(out, lambda stream: stream.write(text), mode="w")
    print(out)
    if args.readme:
        results.update_readme(args.readme, source if not source.is_dir() else results.summarize_run(source))
        print(args.readme)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cxrlib import results

    if len(args.runs) < 2:
        raise ValueError("compare needs at least two runs")
    missing = [run for run in args.runs if not Path(run).exists()]
    if missing:
        raise ValueError(f"no such run folder or summary file: {', '.join(missing)}")
    print(results.render_comparison(results.compare_runs(*args.runs)), end="")
    return 0


#: Exit status for input the project refuses (a bad value, file, archive, manifest or recipe),
#: the status argparse gives a malformed command line.
EXIT_BAD_INPUT = 2


def _one_line(error: BaseException) -> str:
    """An error's message on one line (multi-problem messages joined with '; ')."""
    lines = [line.strip(" -") for line in str(error).splitlines() if line.strip(" -")]
    return "; ".join(lines) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status.

    Input the project refuses (:class:`cxrlib.errors.CxrInputError`, and any ``ValueError``
    from argument validation) and a path that cannot be used (missing, a file where a folder
    is needed, no permission) end as one line on stderr and exit status 2, with nothing
    written: commands validate their arguments before they create files. Set
    ``CXR_TRACEBACK=1`` to see the traceback instead.
    """
    import os

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as error:  # CxrInputError is a ValueError
        if os.environ.get("CXR_TRACEBACK"):
            raise
        print(f"python -m cxrlib {args.command}: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
