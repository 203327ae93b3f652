"""The configuration reference, generated from `configs.settings.Settings`.

    python -m configs.docs           # print the tables
    python -m configs.docs --write   # update README.md, docs/configuration.md, the option list (`make docs`)
    python -m configs.docs --check   # exit 1 when any of them is out of date

Only the text between the markers below is generated; everything around them is left alone. The
list of vLLM's option names (configs/vllm_option_names.txt, read by configs.loader) is generated
whole, from the installed vLLM's parser.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import SecretStr
from pydantic.fields import FieldInfo

from configs.settings import ENGINE, INGRESS, SCALING, SERVING, STREAMING, WORKER, Settings

BEGIN_MARKER = "<!-- BEGIN CONFIGURATION TABLE -->"
END_MARKER = "<!-- END CONFIGURATION TABLE -->"

# The order of the groups in the generated reference.
GROUP_ORDER: tuple[str, ...] = (ENGINE, SERVING, STREAMING, SCALING, INGRESS, WORKER)

REPO_ROOT = Path(__file__).resolve().parent.parent
README = Path("README.md")
CONFIGURATION_PAGE = Path("docs/configuration.md")
OPTION_NAMES = Path("configs/vllm_option_names.txt")

# Written once when docs/configuration.md does not exist; afterwards only the table is regenerated.
CONFIGURATION_PAGE_INTRO = f"""# Configuration

Every setting is an environment variable; the same names (any case) may also be given as `args` of
the Serve config, which win over the environment. An empty variable counts as unset. Defaults
follow RunPod's worker-vllm, so a worker-vllm template's variables keep their meaning. A value
that does not parse stops start-up with a message naming the variable.

## Other vLLM engine arguments

Any other vLLM engine argument, upper-cased (`--enable-prefix-caching` becomes
`ENABLE_PREFIX_CACHING`), is forwarded to vLLM and checked with the argument's own type and
choices: for example `ENABLE_PREFIX_CACHING=true`, `SEED=3`, `DTYPE=bfloat16`,
`ENFORCE_EAGER=false` (passed as `--no-enforce-eager`), `ENABLE_LORA=true`, `MAX_LORAS=2`, or
`SPECULATIVE_CONFIG='{{"method": "ngram", "num_speculative_tokens": 2}}'` given as JSON.

The app owns a few of vLLM's arguments; setting them is an error that names the variable to use
instead: `MODEL` (use `MODEL_NAME`), `SERVED_MODEL_NAME` (use `OPENAI_SERVED_MODEL_NAME_OVERRIDE`),
`DISTRIBUTED_EXECUTOR_BACKEND` (follows `ACCELERATOR`: ray on GPU, mp on CPU),
`DATA_PARALLEL_SIZE` (use `NUM_REPLICAS`; each replica is one engine) and `CHAT_TEMPLATE`
(use `CUSTOM_CHAT_TEMPLATE`). Options of vLLM's own HTTP server, such as `HOST` and `PORT`, are
ignored in the environment (many containers set them) and are an error in the Serve config's
`args` (use `SERVE_HOST` and `SERVE_PORT`).

## Settings

Generated from `configs/settings.py` by `make docs` (`python -m configs.docs --write`).

{BEGIN_MARKER}
{END_MARKER}
"""


class DocsError(Exception):
    """A document cannot be updated (e.g. its markers are missing)."""


# --- the table ---------------------------------------------------------------------------------


def _group(info: FieldInfo) -> str | None:
    extra = info.json_schema_extra
    return extra.get("group") if isinstance(extra, dict) else None  # type: ignore[return-value]


def documented_fields() -> dict[str, list[tuple[str, FieldInfo]]]:
    """The public settings by group, groups in GROUP_ORDER, fields in declaration order."""
    groups: dict[str, list[tuple[str, FieldInfo]]] = {g: [] for g in GROUP_ORDER}
    for name, info in Settings.model_fields.items():
        if info.exclude:  # internal (e.g. engine_cli_overrides), not a variable
            continue
        group = _group(info)
        if group not in groups:
            raise DocsError(f"Settings.{name}: group {group!r} is not one of {list(GROUP_ORDER)}")
        groups[group].append((name, info))
    return {g: fields for g, fields in groups.items() if fields}


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def type_text(info: FieldInfo) -> str:
    kind = _base_type(info.annotation)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return "one of " + ", ".join(str(m.value) for m in kind)
    names = {int: "integer", float: "number", bool: "boolean", str: "string", SecretStr: "secret", Path: "path"}
    # JSON-valued variables: a dict (ROPE_SCALING) or a list of records (LORA_MODULES).
    json_kinds = {dict: "JSON object", tuple: "JSON list", list: "JSON list"}
    text = names.get(kind) or json_kinds.get(typing.get_origin(kind)) or getattr(kind, "__name__", str(kind))
    bounds = []
    for meta in info.metadata:
        for cls, op, attr in ((Gt, ">", "gt"), (Ge, ">=", "ge"), (Lt, "<", "lt"), (Le, "<=", "le")):
            if isinstance(meta, cls):
                bounds.append(f"{op} {getattr(meta, attr)}")
    return text + (" " + ", ".join(bounds) if bounds else "")


def default_text(info: FieldInfo) -> str:
    """The default as a user would write it in the environment; empty for secrets and None."""
    value = info.get_default(call_default_factory=True)
    if value is None or _is_secret(info.annotation) or isinstance(value, SecretStr):
        return ""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        value = "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def configuration_table() -> str:
    """Markdown: a `### group` heading and a `| Variable | Default | Description |` table per group."""
    parts = []
    for group, fields in documented_fields().items():
        lines = [f"### {group}", "", "| Variable | Default | Description |", "| --- | --- | --- |"]
        for name, info in fields:
            description = _cell(info.description or "")
            lines.append(f"| `{name}` | {_cell(default_text(info))} | {description} *({_cell(type_text(info))})* |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# --- the documents -----------------------------------------------------------------------------


def replace_between_markers(text: str, table: str, source: str = "document") -> str:
    """`text` with everything between the two markers replaced by `table`."""
    begin, end = text.count(BEGIN_MARKER), text.count(END_MARKER)
    if begin == 0 or end == 0:
        raise DocsError(
            f"{source} lacks the markers {BEGIN_MARKER} and {END_MARKER}: add both (on lines of their "
            "own) where the configuration table belongs, then run `python -m configs.docs --write`"
        )
    if begin > 1 or end > 1:
        raise DocsError(f"{source}: each configuration table marker must appear exactly once")
    head, rest = text.split(BEGIN_MARKER)
    if END_MARKER in head:
        raise DocsError(f"{source}: {END_MARKER} comes before {BEGIN_MARKER}")
    _, tail = rest.split(END_MARKER)
    return f"{head}{BEGIN_MARKER}\n\n{table.strip()}\n\n{END_MARKER}{tail}"


def expected_text(path: Path, table: str, *, create: bool) -> str:
    """What `path` should contain. `create`: a missing file starts from CONFIGURATION_PAGE_INTRO."""
    if path.exists():
        current = path.read_text(encoding="utf-8")
    elif create:
        current = CONFIGURATION_PAGE_INTRO
    else:
        raise DocsError(f"{path} does not exist")
    return replace_between_markers(current, table, str(path))


def targets(root: Path) -> list[tuple[Path, bool]]:
    """(document, created when missing)."""
    return [(root / README, False), (root / CONFIGURATION_PAGE, True)]


def option_names() -> str:
    """configs/vllm_option_names.txt as the installed vLLM's parser gives it."""
    from configs.loader import installed_vllm_version, option_names_text, vllm_options

    options = vllm_options()  # imports vLLM: it is installed
    return option_names_text(options, installed_vllm_version() or "unknown")


def check(root: Path = REPO_ROOT) -> list[str]:
    """One problem per out-of-date document; empty when all are up to date."""
    table = configuration_table()
    problems = []
    names = root / OPTION_NAMES
    if not names.exists() or names.read_text(encoding="utf-8") != option_names():
        problems.append(f"{names} is out of date: run `python -m configs.docs --write` (or `make docs`)")
    for path, _ in targets(root):
        if not path.exists():
            problems.append(f"{path} does not exist: run `python -m configs.docs --write`")
            continue
        try:
            expected = expected_text(path, table, create=False)
        except DocsError as exc:
            problems.append(str(exc))
            continue
        if path.read_text(encoding="utf-8") != expected:
            problems.append(f"{path} is out of date: run `python -m configs.docs --write` (or `make docs`)")
    return problems


def write(root: Path = REPO_ROOT) -> tuple[list[Path], list[str]]:
    """Updates every document it can; returns (documents changed, problems)."""
    table = configuration_table()
    changed: list[Path] = []
    problems: list[str] = []
    names, expected_names = root / OPTION_NAMES, option_names()
    if not names.exists() or names.read_text(encoding="utf-8") != expected_names:
        names.parent.mkdir(parents=True, exist_ok=True)
        names.write_text(expected_names, encoding="utf-8")
        changed.append(names)
    for path, create in targets(root):
        try:
            expected = expected_text(path, table, create=create)
        except DocsError as exc:
            problems.append(str(exc))
            continue
        if not path.exists() or path.read_text(encoding="utf-8") != expected:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(expected, encoding="utf-8")
            changed.append(path)
    return changed, problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m configs.docs", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update every generated file")
    mode.add_argument("--check", action="store_true", help="exit 1 when any of them is out of date")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)

    if options.check:
        problems = check(options.root)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    if options.write:
        changed, problems = write(options.root)
        for path in changed:
            print(f"updated {path}")
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if problems else 0
    sys.stdout.write(configuration_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
