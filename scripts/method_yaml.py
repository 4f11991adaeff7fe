"""Write a method's YAML (advtrain/conf/method/<name>.yaml) from its Config dataclass, the one place its defaults
and their comments live:

    python scripts/method_yaml.py trades        # rewrite one method's YAML
    python scripts/method_yaml.py --all         # every method advtrain ships
    python scripts/method_yaml.py --check       # exit 1 naming any YAML that differs from its Config (the tests do)

Hydra composes the YAML, so `advtrain --help`, config errors and `--cfg job` stay fast (no torch import) and show
every setting; the Config is where a newcomer writes them. Each field's comment (the lines above it, its inline
comment and any continuation lines aligned under that) is carried over; a field with fixed choices lists them.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import re
import sys
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from advtrain.methods import discover, shipped  # noqa: E402

CONF = REPO / "advtrain" / "conf" / "method"
WIDTH = 118          # characters per YAML line, as the code's
VALUE_COLUMN = 23    # where an inline comment starts when the key and value leave room
SKIPPED = ("name", "_target_")


def method_yaml(name: str) -> str:
    """The YAML text of method `name`: a header from its module docstring, `name:`, then every Config field at its
    default with its comment."""
    cls = discover()[name]
    config = cls.Config
    comments = field_comments(config)
    lines = [*_comment_lines(_summary(sys.modules[cls.__module__].__doc__ or name), ""),
             "# Written by scripts/method_yaml.py from the Config in advtrain/methods/"
             f"{name}.py: edit that, then rerun it.",
             f"name: {name}"]
    for f in fields(config):
        if f.name in SKIPPED:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if default is MISSING:
            raise SystemExit(f"{name}: Config field {f.name!r} has no default; give it one (an interpolation such as "
                             "'${dataset.eps}' for a dataset-dependent one)")
        comment = comments.get(f.name, "")
        choices = f.metadata.get("choices")
        if choices and " | ".join(choices) not in comment:
            comment = f"{comment} ({' | '.join(choices)})" if comment else " | ".join(choices)
        lines += _entry(f"{f.name}: {_value(default)}", comment)
    return "\n".join(lines) + "\n"


def field_comments(config: type) -> dict[str, str]:
    """Field name -> its comment text, read from the source of the Config class and the dataclasses it extends."""
    out: dict[str, str] = {}
    for klass in reversed(config.__mro__):
        if "__dataclass_fields__" not in vars(klass) or klass.__module__.startswith(("builtins", "dataclasses")):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        out.update(_comments_in(source))
    return out


def _comments_in(source: str) -> dict[str, str]:
    """Comments by field in one class's source: full-line comments just above a field, its inline comment, and
    comment-only lines right after it whose '#' sits in the inline comment's column (a wrapped inline comment)."""
    body = ast.parse(source).body[0].body
    lines = source.splitlines()
    out: dict[str, str] = {}
    continued: set[int] = set()  # rows already read as a wrapped inline comment
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.lineno - 1
        above = []
        i = row - 1
        while i >= 0 and i not in continued and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip()[1:].strip())
            i -= 1
        inline, column = _inline_comment(lines[node.end_lineno - 1])
        after = []
        j = node.end_lineno
        while column is not None and j < len(lines) and lines[j].strip().startswith("#") \
                and lines[j].index("#") == column:
            after.append(lines[j].strip()[1:].strip())
            continued.add(j)
            j += 1
        out[node.target.id] = " ".join(part for part in [*above, inline, *after] if part)
    return out


def _inline_comment(line: str) -> tuple[str, int | None]:
    """(the comment after the code on `line`, its '#' column), outside string literals."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[i + 1:].strip(), i
    return "", None


def _summary(doc: str) -> str:
    """The module docstring's first sentence (not cut at "et al." or "e.g.")."""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    for end in re.finditer(r"\. (?=[A-Z(])", first):
        if not first[:end.start()].endswith((" al", "e.g", "i.e", " vs", " cf")):
            return first[:end.start() + 1]
    return first


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def _entry(code: str, comment: str) -> list[str]:
    """`code` with its comment inline where it fits, else the comment wrapped on the lines above."""
    if not comment:
        return [code]
    inline = f"{code:<{max(VALUE_COLUMN, len(code) + 2)}}# {comment}"
    return [inline] if len(inline) <= WIDTH else [*_comment_lines(comment, ""), code]


def _comment_lines(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, WIDTH - len(indent) - 2, break_on_hyphens=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="methods to write (advtrain/methods/<name>.py)")
    parser.add_argument("--all", action="store_true", help="every shipped method")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a YAML differs")
    opts = parser.parse_args(argv)
    names = shipped() if opts.all or opts.check or not opts.names else opts.names
    stale = []
    for name in names:
        path, text = CONF / f"{name}.yaml", method_yaml(name)
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(name)
        if not opts.check:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    if opts.check and stale:
        print(f"differ from their Config: {', '.join(stale)}; run python scripts/method_yaml.py {' '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
