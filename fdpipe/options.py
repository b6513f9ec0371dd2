"""Settings fields declared once, with their command-line form; the click options, `--config FILE` and settings files.

A stage's settings dataclass declares each field with `option(...)`: its default, its help text and, where the CLI
needs more, its flag, choices, metavar or parser. `click_options(Settings)` turns the fields into click options (in
declaration order) plus `--config FILE`, and `settings_from_cli(Settings, ctx, **params)` builds the dataclass, whose
`__post_init__` validates it. Options several stages take (--device, --seed, --workers, --quiet, --storage-options,
--cache-dir and the teacher plan's --views, --crop-scale, --weights) are made here by functions that return
a fresh field each time. This module sits below the stages and imports none of them.

A numeric field may declare its bounds (`option(..., min=, max=)`): the CLI and --config refuse a value outside them
in one line (exit 1, like the dataclasses' own checks), the help shows the range, and `check_bounds(settings)` holds
a dataclass built in Python to the same bounds. Every float (a field's, a pair's, a parsed list's) must also be
finite unless its field says `finite=False`: NaN passes every comparison, so a bound alone would let it through to
the optimizer, and `--lr inf` trains a NaN student.

A field may be repeatable (`option(..., multiple=True)` on a `tuple[X, ...]` field): `--x A --x B` gives (A, B), each
value converted as a single one would be (its parser, choices, path kind and bounds); a --config file gives a list,
or one value.

Also here: the click settings every command uses (CONTEXT) and the group that turns an FdpipeError into one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import json
import math
import os
import re
import types
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable

import click

from .errors import FdpipeError

CONTEXT = dict(help_option_names=["-h", "--help"], show_default=True, max_content_width=110)
# The stored dtypes (`--dtype` of extract and demo): fdpipe.store.quantize.QUANTIZERS, without loading torch for --help.
DTYPES = ("float16", "int8", "int4", "int4-fixed")
# Those whose quantizer has one step for tokens of unit variance (`Quantizer.whitened_only`): whitened features only.
WHITENED_ONLY_DTYPES = ("int4-fixed",)
# `--dtype pca-K`: K int8 coefficients a token in a channel basis fitted on the store's first shard (whitened only)
PCA_DTYPE = re.compile(r"pca-([0-9]+)")


def parse_dtype(value: str) -> str:
    """--dtype: a name of DTYPES, or pca-K with K >= 1 (K below the teacher's channels is checked once it is built)."""
    m = PCA_DTYPE.fullmatch(str(value))
    if value in DTYPES or (m and int(m.group(1)) >= 1):
        return str(value)
    if m:
        raise click.BadParameter(f"{value}: K is the number of coefficients a token keeps, at least 1 (e.g. pca-256)")
    raise click.BadParameter(f"{value!r} is not one of {', '.join(DTYPES)} or pca-K (e.g. pca-256)")


def dtype_option(help: str) -> Any:
    """--dtype of extract and demo: a name of DTYPES or pca-K (parse_dtype), float16 by default."""
    return option("float16", help, parse=parse_dtype, show=str, metavar="|".join((*DTYPES, "pca-K")))


TARGET_SPACES = ("features", "coefficients")


def target_space_option() -> Any:
    """--target-space of distill and demo: what the projection heads predict."""
    return option("features", "What the heads predict: features (the teacher's C channels; a pca-K store's targets "
                              "reconstructed on the device) or coefficients (a pca-K store's K coefficients a token: "
                              "heads K wide, the loss in that space).", choices=TARGET_SPACES)


def whitened_only(dtype: str) -> bool:
    """Whether `dtype` stores whitened features only: a fixed step, or a basis fitted on whitened tokens."""
    return dtype in WHITENED_ONLY_DTYPES or bool(PCA_DTYPE.fullmatch(dtype))
_KEY = "fdpipe"  # the dataclasses.field metadata key


# an OSError the user can fix, by errno: (what happened, what to do). fdpipe replaces every file atomically (a
# temporary file, then a rename) and only appends to logs, so what was written before such an error is intact
_DISK_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space"),
    errno.EROFS: ("read-only file system", "make it writable or write elsewhere"),
    errno.EFBIG: ("file too large (a file-size limit: ulimit -f)", "raise the limit"),
    errno.EACCES: ("permission denied", "fix the permissions or write elsewhere"),
    errno.EPERM: ("operation not permitted", "fix the permissions or write elsewhere"),
}
_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # errors only a write gets


class Group(click.Group):
    """A click group that turns FdpipeError (and a disk that refuses a write) into one line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FdpipeError as e:  # one line, whatever a hostile file name or key put in the message
            raise click.ClickException(" ".join(str(e).split())) from None
        except OSError as e:
            if e.errno not in _DISK_ERRORS:
                raise
            what, todo = _DISK_ERRORS[e.errno]
            where = f" {'writing' if e.errno in _WRITES else 'on'} {e.filename}" if e.filename else ""
            lost = "" if e.errno == errno.ENOSPC else "; nothing written before was lost"
            raise click.ClickException(" ".join(f"{what}{where}{lost}; {todo} and rerun to resume".split())) from None


# ------------------------------------------------------------------------------------------- declaring a field


@dataclasses.dataclass(frozen=True)
class Meta:
    """How a settings field appears on the command line (see `option`)."""

    help: str = ""
    flag: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    show_default: str | None = None
    parse: Callable[[Any], Any] | None = None
    show: Callable[[Any], str] | None = None
    path: str | None = None
    argument: bool = False
    cli: bool = True
    secret: bool = False
    min: float | None = None
    max: float | None = None
    multiple: bool = False
    finite: bool = True


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, flag: str | None = None,
           choices: typing.Sequence[str] | None = None, metavar: str | None = None, show_default: str | None = None,
           parse: Callable[[Any], Any] | None = None, show: Callable[[Any], str] | None = None,
           path: str | None = None, argument: bool = False, cli: bool = True, secret: bool = False,
           min: float | None = None, max: float | None = None, multiple: bool = False, finite: bool = True) -> Any:
    """A settings field (dataclasses.field) with its command-line form.

    default / default_factory: as for dataclasses.field; a field with neither is a required option.
    help: the help text, units included. flag: the flag when it is not --field-name (e.g. "--format").
    choices: the allowed values (click.Choice on the CLI; __post_init__ may check the same tuple).
    metavar, show_default: as click shows them (show_default: a text for defaults that depend on other settings).
    parse: turns the option's text (or a --config value) into the field's value, raising FdpipeError or
    click.BadParameter; show: the text of the default that parse reads back.
    path: "dir" or "file", a click.Path that must not be the other kind.
    argument: a positional argument (a tuple[str, ...] field takes one or more).
    cli: False for a setting that is not an option (--config and settings_yaml still know it).
    secret: left out of settings_yaml (credentials).
    min, max: the bounds of an int or float field (either may be None), refused in one line (see `Bounded`).
    multiple: a repeatable option on a tuple[X, ...] field (default () for none): each value is an X.
    finite: False lets the field's floats be NaN or inf (refused in one line otherwise, as a value out of bounds).
    The click type comes from the field's annotation: int, float, str, tuple[float, float] (nargs 2); a bool is a
    flag (--x), or the pair --x/--no-x when it may be None.
    """
    m = Meta(help=help, flag=flag, choices=tuple(choices) if choices is not None else None, metavar=metavar,
             show_default=show_default, parse=parse, show=show, path=path, argument=argument, cli=cli, secret=secret,
             min=min, max=max, multiple=multiple, finite=finite)
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={_KEY: m})
    return dataclasses.field(default=default, metadata={_KEY: m})


def meta(f: dataclasses.Field) -> Meta:
    try:
        return f.metadata[_KEY]
    except KeyError:
        raise TypeError(f"settings field {f.name!r} is not declared with fdpipe.options.option()") from None


# ------------------------------------------------------------------------------------------------ parsers


# the types of the storage options that fsspec's filesystems (s3fs, gcsfs) pass on unchecked, to fail deep inside
# botocore with a traceback: in the object itself or in its client_kwargs
_STORAGE_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "endpoint_url": (str,), "key": (str,), "secret": (str,), "token": (str,), "profile": (str,),
    "region_name": (str,), "anon": (bool,), "client_kwargs": (dict,), "config_kwargs": (dict,),
    "call_timeout": (int, float), "use_listings_cache": (bool,),
}
_KIND = {str: "a string", bool: "true or false", dict: "an object", int: "a number", float: "a number"}


def parse_storage_options(value: str | dict | None) -> dict:
    """--storage-options: a JSON object (text on the command line, a mapping or text in a --config file)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value, object_pairs_hook=_unique_pairs("--storage-options"))
        except ValueError as e:
            raise FdpipeError(f"--storage-options is not valid JSON ({e}); pass an object like "
                              "'{\"key\": \"...\"}'") from None
    if not isinstance(value, dict):
        raise FdpipeError(f"--storage-options must be a JSON object (got {value!r})")
    for where, options in (("", value), ("client_kwargs.", value.get("client_kwargs"))):
        for k, v in options.items() if isinstance(options, dict) else ():
            kinds = _STORAGE_OPTION_TYPES.get(k)
            if kinds and (not isinstance(v, kinds) or isinstance(v, bool) and bool not in kinds):
                raise FdpipeError(f"--storage-options: {where}{k} is {v!r}, not {' or '.join(_KIND[t] for t in kinds)}")
    return value


def _unique_pairs(where: str) -> Callable[[list[tuple[Any, Any]]], dict]:
    """json.loads' object_pairs_hook that refuses a key given twice (json keeps the last silently)."""

    def pairs(items: list[tuple[Any, Any]]) -> dict:
        out: dict = {}
        for k, v in items:
            if k in out:
                raise FdpipeError(f"{where}: {k!r} is given twice; keep one")
            out[k] = v
        return out

    return pairs


def parse_floats(value: str | typing.Iterable[Any]) -> tuple[float, ...]:
    """A comma-separated list of numbers (or, from a --config file, a list) as a tuple of floats."""
    try:
        if isinstance(value, str):
            return tuple(float(a) for a in value.split(",") if a.strip())
        return tuple(float(a) for a in value)
    except (TypeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers (e.g. -1,-0.5,0,0.5,1)") from None


def show_floats(values: typing.Iterable[float]) -> str:
    """The text parse_floats reads back exactly: -1,-0.5,0.25 (shortest repr, no trailing .0)."""
    return ",".join(r[:-2] if (r := repr(float(v))).endswith(".0") else r for v in values)


# ---------------------------------------------------------------------------------------------- shared options


def device_option(help: str = "Where the model runs; auto picks CUDA when there is one.") -> Any:
    return option("auto", help, choices=("auto", "cpu", "cuda"))


MAX_SEED = 2**32 - 1  # what numpy's global seed takes
MAX_WORKERS = 256
MAX_CLASSES = 100_000  # a head width and the integer labels of a source: ImageNet-21k has 21,843 classes
# a model's input size: one 16-px patch at least, and no more than 4096 px (a view is then 200 MB of float32 pixels)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 4096
MAX_PATCH_SIZE = 64  # a student's patch: its embedding is a conv of that kernel (1000 px took minutes to initialise)


def seed_option(help: str) -> Any:
    return option(0, help, min=0, max=MAX_SEED)


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: a container's or Slurm's share), as PyTorch's DataLoader
    counts them when it warns that there are more workers than cores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def workers_option(help: str, default: int = 4) -> Any:
    """--workers: `default`, or the cores there are when fewer (more workers than cores only compete)."""
    return option(min(default, usable_cpus()), help, min=0, max=MAX_WORKERS)


def quiet_option(help: str = "No progress bar.") -> Any:
    return option(False, help)


def storage_options_option() -> Any:
    return option(default_factory=dict, metavar="JSON", parse=parse_storage_options, secret=True,
                  help="fsspec storage options for remote stores, as JSON (e.g. '{\"anon\": false}').")


def cache_dir_option(help: str) -> Any:
    return option(None, help, path="dir")


# the plan and teacher settings a store carries; extract and online distill take them alike


def views_option() -> Any:
    from .augment import MAX_VIEWS  # what a plan (and so a store) may hold

    return option(8, "Augmented views V per image.", min=1, max=MAX_VIEWS)


def crop_scale_option() -> Any:
    return option((0.08, 1.0), "Area fraction range of the plan's RandomResizedCrop views.", metavar="MIN MAX")


def crop_policy_option() -> Any:
    # 2 is augment.POLICY_VERSION (not imported here: `fdpipe --help` must not load torch)
    return option(2, "Crop policy version of a new plan: 2 resizes the crops with torchvision's uint8 kernels "
                     "(2.5x PIL's speed), 1 with PIL. A store's plan keeps the version it was made with.",
                  min=1, max=2)


def view_codec_option(default: str | None, help: str) -> Any:
    return option(default, "jpeg:Q (quality 1-100), png (lossless) or raw (uint8 .npy): " + help,
                  metavar="jpeg:Q|png|raw")


def weights_option(help: str = "Teacher weights: safetensors, a timm state dict, or an OpenAI/open_clip CLIP "
                               "checkpoint.") -> Any:
    return option(None, help, path="file")


# ------------------------------------------------------------------------------------------------- bounds


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    return f", at least {lo}" if lo is not None else f", at most {hi}" if hi is not None else ""


def bound_problem(value: float, lo: float | None, hi: float | None, finite: bool = True) -> str | None:
    """'must be at least 1 (got 0)' for a value outside [lo, hi], 'must be a finite number, at least 0 (got nan)'
    for a float that is NaN or inf (unless not `finite`), else None."""
    if finite and isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number{_range(lo, hi)} (got {value})"
    if lo is not None and value < lo:
        return f"must be at least {lo} (got {value})"
    if hi is not None and value > hi:
        return f"must be at most {hi} (got {value})"
    return None


def values_problem(value: Any, m: Meta) -> str | None:
    """bound_problem of a field's value, or of each number of a tuple or list value (a pair, a repeated option, a
    parsed list); None for values that are not numbers."""
    for v in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            problem = bound_problem(v, m.min, m.max, m.finite)
            if problem:
                return problem
    return None


def check_bounds(cfg: Any) -> None:
    """Hold a settings dataclass built in Python to its fields' declared bounds (the CLI checks them on parsing)."""
    for f in dataclasses.fields(cfg):
        m = f.metadata.get(_KEY)
        problem = values_problem(getattr(cfg, f.name), m) if m is not None else None
        if problem:
            raise FdpipeError(f"{m.flag or '--' + f.name.replace('_', '-')} {problem}")


class Bounded(click.IntRange):
    """An int (or float) within bounds whose out-of-range value is a one-line FdpipeError (exit 1, as the settings'
    own checks), while text that is not a number stays a usage error; click shows the range in the help."""

    def __init__(self, kind: type, lo: float | None, hi: float | None, finite: bool = True):
        super().__init__(lo, hi)
        self.kind = click.INT if kind is int else click.FLOAT
        self.name = self.kind.name
        self.finite = finite

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        value = self.kind.convert(value, param, ctx)
        problem = bound_problem(value, self.min, self.max, self.finite)
        if problem:
            raise FdpipeError(f"{_flag(param)} {problem}")
        return value


def _flag(param: click.Parameter | None) -> str:
    return param.opts[0] if param is not None and param.opts else "the value"


# ------------------------------------------------------------------------------------------ fields -> click


class _Parsed(click.ParamType):
    """A click type that runs a field's parser (on the option's text or a --config value), then holds the numbers
    it gives to the field's bounds."""

    def __init__(self, parse: Callable[[Any], Any], name: str, m: Meta):
        self.parse, self.name, self.meta = parse, name, m

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        value = self.parse(value)
        problem = values_problem(value, self.meta)
        if problem:
            raise FdpipeError(f"{_flag(param)} {problem}")
        return value


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) of a hint like `int | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _click_type(hint: Any, m: Meta) -> Any:
    if m.parse is not None:
        return _Parsed(m.parse, (m.metavar or "text").lower(), m)
    if m.choices is not None:
        return click.Choice(m.choices)
    if m.path is not None:
        return click.Path(file_okay=m.path != "dir", dir_okay=m.path != "file")
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return _click_type(args[0], m)
        return tuple(_click_type(a, m) for a in args)
    if hint is float or hint is int and (m.min is not None or m.max is not None):
        return Bounded(hint, m.min, m.max, m.finite)
    if hint in (int, float, str):
        return hint
    raise TypeError(f"no click type for {hint!r}; give the field a parse= function")


def _spec(name: str, f: dataclasses.Field, hint: Any) -> tuple[type[click.Parameter], list[str], dict[str, Any]]:
    """The click parameter class, declarations and keywords of one settings field."""
    m = meta(f)
    base, optional = _unwrap(hint)
    required = f.default is MISSING and f.default_factory is MISSING
    default = f.default if f.default is not MISSING else None
    if m.argument:
        variadic = typing.get_origin(base) is tuple and typing.get_args(base)[1:] == (Ellipsis,)
        return click.Argument, [name], dict(type=_click_type(base, m), nargs=-1 if variadic else 1,
                                            required=required, metavar=m.metavar)
    flag = m.flag or "--" + name.replace("_", "-")
    kw: dict[str, Any] = dict(help=m.help, required=required)
    if m.metavar is not None:
        kw["metavar"] = m.metavar
    if m.show_default is not None:
        kw["show_default"] = m.show_default
    if m.multiple:  # --x A --x B: (A, B), each value typed as one; () when not given
        elem = typing.get_args(base)[0] if typing.get_origin(base) is tuple else base
        return click.Option, [flag, name], dict(kw, type=_click_type(elem, m), multiple=True, default=None)
    if base is bool:
        if optional:  # --x/--no-x, None when neither is given
            return click.Option, [f"{flag}/--no-{flag[2:]}", name], dict(kw, default=default)
        return click.Option, [flag, name], dict(kw, is_flag=True, default=bool(default))
    if m.parse is not None:  # the option holds text: its default is the text the parser reads back
        default = m.show(default) if m.show is not None and default is not None else None
    if f.default_factory is not MISSING:  # e.g. --storage-options: {} when not given
        kw["callback"] = lambda _ctx, _param, value: f.default_factory() if value is None else value
    return click.Option, [flag, name], dict(kw, type=_click_type(base, m), default=default)


def click_option(name: str, f: dataclasses.Field, hint: Any = str) -> Callable:
    """One field as a click decorator, for commands without a settings class (`fdpipe store`, `fdpipe demo`)."""
    kind, decls, kw = _spec(name, f, hint)
    return (click.argument if kind is click.Argument else click.option)(*decls, **kw)


def click_options(cls: type) -> Callable:
    """Decorator: the settings class's fields as click parameters, in declaration order, then --config FILE."""
    hints = typing.get_type_hints(cls)
    decorators = [click_option(f.name, f, hints[f.name]) for f in dataclasses.fields(cls) if meta(f).cli]
    decorators.append(click.option(
        "--config", type=click.Path(dir_okay=False), metavar="FILE", is_eager=True, expose_value=False,
        callback=lambda ctx, _param, path: _apply_config(cls, ctx, path),
        help="Read settings from a YAML or JSON file of `name: value` lines (field or flag names: batch_size or "
             "batch-size); flags given beside it override it."))
    decorators.append(print_config_option())

    def decorate(fn: Callable) -> Callable:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return decorate


def settings_from_cli(cls: type, ctx: click.Context, **params: Any) -> Any:
    """The settings from a command's parsed parameters (and --config's non-option fields); validated by cls.

    An option left at None takes the field's default (None, or e.g. {} for --storage-options).
    """
    values = {k: v for k, v in params.items() if v is not None}
    dm = ctx.default_map or {}
    values |= {f.name: dm[f.name] for f in dataclasses.fields(cls)
               if not meta(f).cli and f.name in dm and dm[f.name] is not None}
    return cls(**values)


# ------------------------------------------------------------------------------------------------ --config FILE


MAX_CONFIG_BYTES = 1 << 20  # a settings file is a few hundred bytes


def read_config(path: str | Path) -> dict[str, Any]:
    """A settings file: a YAML (.yaml, .yml) or JSON (.json) mapping of at most MAX_CONFIG_BYTES, read only if it
    is a regular file; every problem is one FdpipeError line."""
    path = Path(path)
    kind = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}.get(path.suffix.lower())
    if kind is None:
        raise FdpipeError(f"--config {path}: name the file .yaml, .yml or .json (it says which format it is)")
    from .files import RefusedFileError, read_regular

    try:
        text = read_regular(path, MAX_CONFIG_BYTES, "a settings file may have").decode("utf-8")
    except FileNotFoundError:
        raise FdpipeError(f"--config {path}: no such file; pass the path of a YAML or JSON settings file") from None
    except RefusedFileError as e:  # a FIFO would block forever, /dev/zero never ends
        raise FdpipeError(f"--config {path}: it {e}; pass a YAML or JSON settings file") from None
    except OSError as e:
        raise FdpipeError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise FdpipeError(f"--config {path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); save "
                          "it as UTF-8") from None
    import yaml

    try:
        data = (json.loads(text, object_pairs_hook=_unique_pairs(f"--config {path}")) if kind == "JSON" else
                yaml.load(text, Loader=_unique_keys_loader(f"--config {path}")))
    except (ValueError, yaml.YAMLError) as e:  # their messages span lines
        raise FdpipeError(f"--config {path}: not valid {kind} ({' '.join(str(e).split())}); fix the file") from None
    except RecursionError:  # both parsers recurse once per level of nesting
        raise FdpipeError(f"--config {path}: nested too deep to read; a settings file holds flat "
                          "`name: value` lines") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FdpipeError(f"--config {path}: holds a {type(data).__name__}, not a mapping of settings; write one "
                          "`name: value` per line (e.g. `epochs: 10`)")
    return data


def _unique_keys_loader(where: str) -> type:
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last silently), and any
    alias (`*name`): nine nested aliases of nine make a billion values ("billion laughs") out of a few lines, which
    every later look at the value (a check, a message, a copy) walks."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise FdpipeError(f"{where}: line {mark.line + 1} uses a YAML alias (*{self.peek_event().anchor}); "
                                  "fdpipe reads no aliases: write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise FdpipeError(f"{where}: {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                                      "keep one")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


# what a --config value of each field type must be: (its description, the types it may have); text is converted
# as on the command line (YAML reads 1e-4 as text), but no number or list becomes text and no list becomes a number
_SHAPES: dict[Any, tuple[str, tuple[type, ...]]] = {
    bool: ("true or false", (bool, str)), int: ("a whole number", (int, str)), float: ("a number", (int, float, str)),
    str: ("text (quote it)", (str,)),
}


def config_shape_problem(value: Any, hint: Any, m: Meta) -> str | None:
    """What a --config value should be when it cannot be the value of a field typed `hint` (a list for a number,
    true or 2.5 for a whole number, a number for a pair), else None. Click's own conversion would take true as 1
    and 2.5 as 2, or raise a TypeError; a field with a parser (parse=) checks its values itself."""
    base, optional = _unwrap(hint)
    if m.parse is not None or value is None and optional:
        return None
    if typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        n = "" if args[1:] == (Ellipsis,) else f"{len(args)} "
        what, _ = _SHAPES.get(args[0], ("values", ()))
        wrong = not isinstance(value, list) or n and len(value) != len(args)
        if wrong or any(config_shape_problem(v, args[0], m) for v in value):
            return f"a list of {n}values, each {what}"
        return None
    if base not in _SHAPES:
        return None
    what, kinds = _SHAPES[base]
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    return None if ok else what


def _apply_config(cls: type, ctx: click.Context, path: str | None) -> None:
    """--config's callback (eager): the file's values become the defaults of the options not given as flags.

    Click takes a parameter's value from ctx.default_map only when the command line does not give it, so a flag
    overrides the file and a file may supply a required option. Each value is converted by the option's own click
    type here, so that a bad one names the file; the dataclass validates the whole when it is built.
    """
    if path is None or ctx.resilient_parsing:
        return
    data = read_config(path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = {name: name for name in fields}
    params = {p.name: p for p in ctx.command.params}
    for name, p in params.items():
        if name in fields and isinstance(p, click.Option):
            names |= {o.lstrip("-"): name for o in p.opts}
    values = {}
    for key, value in data.items():
        name = names.get(str(key))
        if name is None:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise FdpipeError(f"--config {path}: unknown setting {key!r}{hint}; use the field or flag names that "
                              f"`{ctx.command_path} --help` lists")
        if name in values:
            raise FdpipeError(f"--config {path}: {name} is set twice (as {key!r} too); keep one")
        param = params.get(name)
        if param is None:  # a settings field that is not an option (e.g. distill's clip_grad)
            kind, decls, kw = _spec(name, fields[name], hints[name])
            param = kind(decls, **kw)
        if getattr(param, "multiple", False) and not isinstance(value, (list, tuple)):
            value = [value]  # a repeatable option given once in the file
        expected = config_shape_problem(value, hints[name], meta(fields[name]))
        if expected:
            raise FdpipeError(f"--config {path}: {key} is {value!r}, not {expected}")
        try:
            values[name] = None if value is None else param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise FdpipeError(f"--config {path}: {key}: {e.message}") from None
        except FdpipeError as e:  # a value outside its bounds
            raise FdpipeError(f"--config {path}: {e}") from None
    ctx.default_map = {**(ctx.default_map or {}), **values}


def settings_yaml(cfg: Any, head: str = "the resolved settings of this run; pass this file to --config to run it "
                                         "again") -> str:
    """A settings dataclass as YAML that `--config` reads back to equal settings (secret fields left out), under a
    `# head` comment line."""
    import yaml

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    values = {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not meta(f).secret}
    left_out = [f.name for f in dataclasses.fields(cfg) if meta(f).secret]
    head = f"# {head}" + (f" ({', '.join(left_out)} left out)\n" if left_out else "\n")
    class Dumper(yaml.SafeDumper):  # one `name: value` line per field, lists inline: crop_scale: [0.08, 1.0]
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return head + yaml.dump(values, Dumper=Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------------ --print-config

_PRINT_CONFIG = "fdpipe.print_config"  # the ctx.meta key --print-config sets


def print_config_option() -> Callable:
    """--print-config, which every command with a settings class takes (click_options adds it)."""
    return click.option(
        "--print-config", is_flag=True, expose_value=False,
        callback=lambda ctx, _param, value: ctx.meta.__setitem__(_PRINT_CONFIG, value),
        help="Print the resolved settings (every default the run would fill in, e.g. the recipe by size) as the YAML "
             "--config takes, then exit without running; reads no images.")


def print_config(ctx: click.Context, cfg: Any, resolve: Callable[[Any, int], Any] | None = None) -> None:
    """With --print-config: print `resolve(cfg, world size)` as settings YAML and exit 0; otherwise nothing.

    The command calls it once its settings are built and its local paths checked, so that a bad setting is the same
    one line with --print-config as without; `resolve` is the function the stage itself fills its defaults with
    (the world size is torchrun's or Slurm's, else 1: the global batch scales the learning rates)."""
    if not ctx.meta.get(_PRINT_CONFIG):
        return
    if resolve is not None:
        from .runtime import ranks_from_env

        cfg = resolve(cfg, ranks_from_env().world)
    click.echo(settings_yaml(cfg, "the resolved settings; pass this file to --config to run them"), nl=False)
    ctx.exit(0)
