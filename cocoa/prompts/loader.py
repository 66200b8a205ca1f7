"""Jinja prompt library for teacher synthesis.

Templates are ``{task}_{kind}.j2`` files (``caption_natural.j2``, ``qa_document.j2``, ...) rendered in a
:class:`jinja2.sandbox.SandboxedEnvironment` with :class:`jinja2.StrictUndefined`: a template cannot reach
Python internals (``{{ ''.__class__.__mro__ }}`` raises), and a misspelt variable is an error, not an empty
string. A user directory (``--prompts DIR``) is searched before the built-in templates, so it can override
a built-in file (same name) or add new kinds.

Context variables every template receives: ``dataset`` (source dataset name), ``kind`` (image kind),
``task``, ``qry`` (the record's query text, image placeholders removed), ``pos_text`` (its positive
text), ``role`` (``query`` or ``positive``: which of the record's images this is), ``k`` (number of QA
pairs asked for) and ``schema`` (the output JSON schema, compact JSON).

Each template's content hash (its source and those of the templates it includes, extends or imports)
is recorded on every output, so outputs of an edited template never mix silently with older ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import SandboxedEnvironment

from ..records import digest
from ..errors import CocoaError

BUILTIN_DIR = Path(__file__).parent
TEMPLATE_SUFFIX = ".j2"

#: Image kinds with their own template variants; anything else falls back to ``natural``.
KINDS = ("natural", "document")

#: MMEB (and common) datasets whose images are documents, charts, infographics, tables or screenshots.
DOCUMENT_DATASETS = frozenset({
    "docvqa", "infographicsvqa", "infovqa", "chartqa", "textvqa", "ocrvqa", "ocr-vqa", "scienceqa",
    "tabfact", "wiki-ss-nq", "plotqa", "dvqa", "figureqa", "screen2words", "websrc", "visrag",
})
_DOC_HINTS = ("doc", "chart", "infograph", "table", "ocr", "screen", "slide", "plot", "figure", "receipt")

_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")


class PromptError(CocoaError):
    """A template is missing, malformed, unsafe or refers to an unknown variable."""


def _check_sandbox(ast: Any, where: str) -> None:
    """Refuse, when a template is loaded, what the sandbox would refuse only when that line renders:
    access to a private or dunder attribute (``x.__class__``, ``x['_y']``), on any branch."""
    from jinja2 import nodes

    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        attr = node.attr if isinstance(node, nodes.Getattr) else (
            node.arg.value if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str) else None)
        if attr is not None and attr.startswith("_"):
            raise PromptError(f"template {where} line {node.lineno}: access to {attr!r} is refused by the sandbox "
                              "(private and dunder attributes are off limits); remove it")


def image_kind(dataset: str, meta: dict[str, Any] | None = None) -> str:
    """``document`` for document/chart/infographic datasets, else ``natural``; ``meta["image_kind"]`` wins."""
    if meta and isinstance(meta.get("image_kind"), str) and meta["image_kind"]:
        return meta["image_kind"]
    name = (dataset or "").lower()
    base = name.split("/")[-1]
    if base in DOCUMENT_DATASETS or any(h in base for h in _DOC_HINTS):
        return "document"
    return "natural"


def clean_text(text: str | None) -> str:
    """Record text for a prompt: MMEB's ``<|image_N|>`` placeholders removed, whitespace collapsed."""
    return " ".join(_PLACEHOLDER.sub(" ", text or "").split())


@dataclass(frozen=True)
class Template:
    name: str          # file stem, e.g. "caption_natural"
    origin: str        # "builtin" or the user directory
    source: str
    hash: str          # content hash (with referenced templates)


class _ContainedLoader(jinja2.FileSystemLoader):
    """A :class:`jinja2.FileSystemLoader` that reads a template only when its path, symlinks resolved,
    stays inside the directory it is found in: a ``--prompts`` file linking to ``/etc/...`` is refused,
    never read or rendered (:func:`cocoa.fs.contained`)."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Any]:
        from ..fs import UnsafePathError, contained

        for sp in self.searchpath:
            if (Path(sp) / template).exists() or (Path(sp) / template).is_symlink():
                try:
                    contained(sp, template, where=f"--prompts {sp}", file=True)
                except UnsafePathError:
                    raise PromptError(
                        f"template {Path(sp) / template} resolves (through a symlink) outside {sp} or is not a "
                        "file; cocoa reads templates only from inside the prompts directory: copy the file into it"
                    ) from None
                break
        return super().get_source(environment, template)


@dataclass(frozen=True)
class RenderedPrompt:
    template: Template
    text: str


class PromptLibrary:
    """Built-in templates plus an optional user directory searched first."""

    def __init__(self, extra_dir: str | Path | None = None) -> None:
        self.extra_dir = Path(extra_dir) if extra_dir else None
        if self.extra_dir is not None and not self.extra_dir.is_dir():
            raise PromptError(f"--prompts {self.extra_dir}: no such directory; give a directory of *.j2 templates")
        dirs = ([str(self.extra_dir)] if self.extra_dir else []) + [str(BUILTIN_DIR)]
        self.env = SandboxedEnvironment(
            loader=_ContainedLoader(dirs),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
        )
        self._cache: dict[str, Template] = {}
        # Compile every template now, so a syntax error in a user directory is reported before any work.
        for name in self.names():
            self.get(name)

    def names(self) -> list[str]:
        found: set[str] = set()
        for d in [self.extra_dir, BUILTIN_DIR]:
            if d is not None:
                found.update(p.stem for p in d.glob(f"*{TEMPLATE_SUFFIX}"))
        return sorted(found)

    def _file(self, name: str) -> Path:
        for d in [self.extra_dir, BUILTIN_DIR]:
            if d is not None and (d / f"{name}{TEMPLATE_SUFFIX}").is_file():
                return d / f"{name}{TEMPLATE_SUFFIX}"
        raise PromptError(
            f"no template {name}{TEMPLATE_SUFFIX} (looked in {self.extra_dir or '-'} and the built-ins); "
            f"available: {', '.join(self.names())}"
        )

    def _closure_sources(self, filename: str, seen: set[str]) -> list[str]:
        """The template's source and, recursively, those of templates it references."""
        if filename in seen:
            return []
        seen.add(filename)
        try:
            source, path, _ = self.env.loader.get_source(self.env, filename)  # type: ignore[union-attr]
        except jinja2.TemplateNotFound:
            raise PromptError(f"template {filename} is referenced but not found") from None
        except UnicodeDecodeError as e:
            raise PromptError(f"template {self._where(filename)} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              "save it as UTF-8") from None
        except OSError as e:
            raise PromptError(f"template {self._where(filename)} cannot be read ({e.strerror or e})") from None
        try:
            ast = self.env.parse(source, filename, path)
        except jinja2.TemplateSyntaxError as e:
            raise PromptError(f"template {path}: syntax error at line {e.lineno}: {e.message}") from None
        _check_sandbox(ast, path or filename)
        refs = jinja2.meta.find_referenced_templates(ast)
        out = [f"{filename}\n{source}"]
        for ref in refs:
            if ref is None:
                raise PromptError(f"template {path} includes a template chosen at render time; name it literally")
            out += self._closure_sources(ref, seen)
        return out

    def _where(self, filename: str) -> str:
        for d in [self.extra_dir, BUILTIN_DIR]:
            if d is not None and (d / filename).is_file():
                return str(d / filename)
        return filename

    def get(self, name: str) -> Template:
        if name in self._cache:
            return self._cache[name]
        f = self._file(name)
        sources = self._closure_sources(f.name, set())
        t = Template(
            name=name,
            origin="builtin" if f.parent == BUILTIN_DIR else str(f.parent),
            source=sources[0].split("\n", 1)[1],
            hash=digest("\n\0".join(sources))[:16],
        )
        self._cache[name] = t
        return t

    def select(self, task: str, kind: str) -> Template:
        """The template for ``task`` on an image of ``kind``: ``{task}_{kind}``, else ``{task}``, else ``{task}_natural``."""
        names = set(self.names())
        for cand in (f"{task}_{kind}", task, f"{task}_natural"):
            if cand in names:
                return self.get(cand)
        raise PromptError(f"no template for task {task!r} (kind {kind!r}); add {task}_{kind}{TEMPLATE_SUFFIX} to --prompts")

    def render(self, template: Template | str, **context: Any) -> RenderedPrompt:
        t = self.get(template) if isinstance(template, str) else template
        try:
            text = self.env.get_template(f"{t.name}{TEMPLATE_SUFFIX}").render(**context)
        except jinja2.exceptions.SecurityError as e:
            raise PromptError(f"template {t.name}{TEMPLATE_SUFFIX} ({t.origin}) was refused by the sandbox: {e}") from None
        except jinja2.UndefinedError as e:
            raise PromptError(
                f"template {t.name}{TEMPLATE_SUFFIX} ({t.origin}) uses an undefined variable: {e.message}; "
                "known: dataset, kind, task, qry, pos_text, role, k, schema"
            ) from None
        except jinja2.TemplateError as e:
            raise PromptError(f"template {t.name}{TEMPLATE_SUFFIX} ({t.origin}) failed to render: {e}") from None
        text = text.strip()
        if not text:
            raise PromptError(f"template {t.name}{TEMPLATE_SUFFIX} ({t.origin}) rendered to an empty prompt")
        return RenderedPrompt(template=t, text=text)

    def check(self, tasks: list[str] | tuple[str, ...], *, k: int = 3, schemas: dict[str, str] | None = None) -> None:
        """Test-render every template a run of ``tasks`` could select, for every image kind and role,
        with and without record text, so a template that fails (sandbox, undefined variable, empty
        output, a bad include) is refused before any output is written, not halfway through a run."""
        names = set(self.names())
        for task in tasks:
            used = sorted(n for n in names if n == task or n.startswith(f"{task}_"))
            if not used:
                self.select(task, "natural")  # raises: no template for the task
            for name in used:
                kind = name[len(task) + 1:] or "natural"
                for role, qry, pos in (("query", "an example query", "an example text"), ("positive", "", "")):
                    self.render(name, dataset="example", kind=kind, task=task, qry=qry, pos_text=pos, role=role,
                                k=k, schema=(schemas or {}).get(task, "{}"))

    def hashes(self) -> dict[str, str]:
        return {n: self.get(n).hash for n in self.names()}
