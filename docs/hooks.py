"""MkDocs hooks: the pages that live outside docs/ (README.md as the home page, SPEC.md,
CHANGELOG.md, bench/RESULTS.md and the figures under bench/figures) are served from where they
are, and the command line reference is the commands' own ``--help``, rendered at build time."""

from __future__ import annotations

import glob
import os

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = ["SPEC.md", "CHANGELOG.md", "bench/RESULTS.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "bench", "figures", "*.png")))]
MARKER = "<!-- cli-help -->"
SIGNATURES = "<!-- dropin-signatures -->"


def on_files(files, config):
    for rel in OUTSIDE:
        files.append(File(rel, ROOT, config["site_dir"], config["use_directory_urls"]))
    files.append(File.generated(config, "index.md", abs_src_path=os.path.join(ROOT, "README.md")))
    return files


def cli_help() -> str:
    """``memopt-func --help`` and every subcommand's, as Markdown sections."""
    from memopt_func.apps.cli import build_parser

    parser = build_parser()
    out = ["## memopt-func", "", "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        out += [f"## memopt-func {name}", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def dropin_signatures() -> str:
    """Each named drop-in's signature, as ``inspect.signature`` gives it (the static reader of the
    API reference sees only ``MemoryOptimizer.__init__``'s ``*args, **kwargs``)."""
    import inspect

    from memopt_func import optim

    out = []
    for name in ("Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix"):
        out += [f"### `{name}`", "", "```python", f"{name}{inspect.signature(getattr(optim, name))}", "```", ""]
    return "\n".join(out)


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "index.md":  # the README: its links into docs/ are site links here
        return markdown.replace("](docs/", "](")
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_help())
    if SIGNATURES in markdown:
        markdown = markdown.replace(SIGNATURES, dropin_signatures())
    return markdown
