"""One config mechanism for every ``fewstep`` command: a dataclass schema, a YAML file, flags, ``key=value``.

A command declares its settings once, as a dataclass (an OmegaConf structured config:
unknown keys and wrong types are rejected with a message naming the key;
``__post_init__`` does the semantic checks and raises ``ValueError``). Values are
layered, later wins::

    schema defaults  <  --config FILE.yaml  <  flags given on the command line  <  key=value overrides

Flags keep the names users know (``--num-samples``); their ``dest`` is the schema key
(``num_samples``) and a flag that is not given does not override the file, because
the subparser is created with ``argument_default=argparse.SUPPRESS``. Overrides are
OmegaConf dotlist items (``nfe=[5,6] solvers=[ddim,unipc] guidance=2``); a scalar
given for a list key is a one-element list (``nfe=8``). The resolved config is saved as
``config.yaml`` beside the command's results, so ``--config OUT/config.yaml`` reruns it.

Usage pattern (``fewstep compare`` in ``fewstep/eval/compare.py`` is the full example)::

    @dataclass
    class CalibrateConfig:
        model: str = "digits"
        nfe: List[int] = field(default_factory=lambda: [5, 6, 8])
        out: str = "runs/calibrate"

        def __post_init__(self):
            self.nfe = check_nfe_list(self.nfe)        # the shared validators: fewstep/infra/validation.py

    def add_calibrate_parser(sub):
        p = sub.add_parser("calibrate", help="...", argument_default=argparse.SUPPRESS)
        p.add_argument("--nfe", type=int, nargs="+", help="NFEs (default: 5 6 8)")
        p.add_argument("--out", help="output folder (default: runs/calibrate)")
        add_config_arguments(p, CalibrateConfig)
        p.set_defaults(func=cmd_calibrate)

    def cmd_calibrate(args):
        cfg = resolve_config(CalibrateConfig, args)   # a validated CalibrateConfig instance
        ...
        save_config(cfg, cfg.out)                      # OUT/config.yaml, written atomically

``fewstep.cli.main`` pulls the ``key=value`` items out of the command line (see
:func:`split_overrides`) and turns the ``ValueError`` raised here into one
``fewstep <cmd>: error: ...`` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

__all__ = [
    "torch_threads", "check_runtime_settings", "add_threads_argument", "add_cache_dir_argument",
    "add_config_arguments", "add_runtime_arguments", "resolve_config", "load_config", "save_config", "split_overrides",
    "resolve_device", "parse_spec", "CONFIG_NAME", "refuse_multiple_processes", "override_example",
]

T = TypeVar("T")
CONFIG_NAME = "config.yaml"
# Namespace entries that belong to argparse plumbing, not to a schema.
# argparse plumbing, not settings; nested subcommands store their name as "<group>_command".
_RESERVED = {"func", "command", "config", "overrides", "config_schema", "resume_hint"}
_OVERRIDE = re.compile(r"^([A-Za-z_]\w*)([.\[][^=]*)?=")


def add_config_arguments(parser: argparse.ArgumentParser, schema: type) -> None:
    """Add ``--config FILE`` and the positional ``key=value`` overrides to a subparser.

    Args:
        parser: A subparser created with ``argument_default=argparse.SUPPRESS`` whose
            flags' ``dest`` names are keys of ``schema``.
        schema: The command's dataclass.

    Raises:
        TypeError: when the parser would let absent flags override the config file.
    """
    if parser.argument_default is not argparse.SUPPRESS:
        raise TypeError(f"{parser.prog}: create the subparser with argument_default=argparse.SUPPRESS")
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"schema must be a dataclass, got {schema!r}")
    flagged = {a.dest for a in parser._actions}
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="read settings from a YAML file (flags and key=value items override it)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                        help=f"settings in OmegaConf dotlist form, applied last, e.g. {override_example(schema)}")
    parser.set_defaults(config_schema=schema)
    unflagged = [f for f in dataclasses.fields(schema) if f.name not in flagged]
    if unflagged:  # settings only a file or key=value can set: list them, or help would hide them
        docs = _attribute_docs(schema)
        lines = [f"  {f.name}={_yaml_value(_default(f))}" + (f"  {docs[f.name]}" if f.name in docs else "")
                 for f in unflagged]
        heading = "Settings without a flag (key=value; shown with their defaults):"
        parser.epilog = "\n".join(filter(None, [parser.epilog, heading, *lines]))
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _yaml_value(value: Any) -> str:
    """``value`` as a key=value item writes it (``[5,6]``, ``null``, ``true``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    if value is None or value is dataclasses.MISSING:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def override_example(schema: type) -> str:
    """Two ``key=value`` items valid for ``schema`` (its own defaults), for help texts."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    preferred = [k for k in ("nfe", "seed", "num_samples", "budget") if k in fields]
    rest = [k for k, f in fields.items() if isinstance(_default(f), (int, float, str)) and not isinstance(_default(f), bool)]
    keys = list(dict.fromkeys(preferred + rest))[:2]
    return " ".join(f"{k}={_yaml_value(_default(fields[k]))}" for k in keys)


def _attribute_docs(schema: type) -> dict[str, str]:
    """The ``Attributes:`` section of a Google-style docstring, as {field: first sentence}."""
    docs, names, in_section = {}, [], False
    for line in (schema.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            in_section = True
            continue
        if not in_section:
            continue
        if not text:
            break
        m = re.match(r"^([\w, ]+):\s*(.*)$", text)
        if m and all(n.strip().isidentifier() for n in m.group(1).split(",")):
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                docs[n] = m.group(2)
        else:
            for n in names:
                docs[n] += " " + text
    # plain text: ``x`` -> x, :class:`~a.B` -> B
    return {k: re.sub(r":\w+:`~?(?:[\w.]*\.)?(\w+)`", r"\1", " ".join(v.split())).replace("``", "")
            for k, v in docs.items()}


MODEL_HELP = "digits (default), gmm, gmm-flow, or a diffusers pipeline folder"


def add_runtime_arguments(parser: argparse.ArgumentParser, *, model: str | None = MODEL_HELP,
                          distributed: bool = False, default_threads: int = 1) -> None:
    """The flags every job command shares, in one "model and run" group: ``--model`` (when
    ``model`` is its help text), ``--device``, ``--threads`` and ``--no-progress``.

    Their values are checked by :func:`check_runtime_settings` (in the schema's ``__post_init__``).

    Args:
        parser: The command's subparser (``dest`` names are the schema keys model, device,
            threads, progress).
        model: Help text of ``--model``; None: the command takes no model.
        distributed: The command runs data-parallel under torchrun (says what ``cuda`` means there).
        default_threads: The schema's default thread count, for the help text.
    """
    group = parser.add_argument_group("model and run")
    if model is not None:
        group.add_argument("--model", metavar="NAME|DIR", help=model)
    group.add_argument("--device", help="cpu (default), cuda" + (" (each process its LOCAL_RANK GPU)" if distributed
                                                                else "") + ", cuda:N or mps")
    add_threads_argument(group, f"torch CPU threads{' per process' if distributed else ''} (default: {default_threads})")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def add_cache_dir_argument(parser: argparse.ArgumentParser, keeps: str) -> None:
    """``--cache-dir DIR`` (dest ``cache_dir``): fewstep's cache folder, the same folder for every command.

    Args:
        parser: The command's subparser.
        keeps: What this command keeps there, e.g. ``"reference samples in DIR/references"``.
    """
    parser.add_argument("--cache-dir", dest="cache_dir", metavar="DIR",
                        help=f"fewstep's cache folder, the same for every command; this one keeps {keeps} "
                             "(default: $FEWSTEP_CACHE or ~/.cache/fewstep)")


def add_threads_argument(parser: "argparse.ArgumentParser | argparse._ArgumentGroup",
                         help: str = "torch CPU threads") -> None:
    """``--threads N`` (dest ``threads``), the one declaration of the flag (also for scripts without a schema)."""
    parser.add_argument("--threads", type=int, metavar="N", help=help)


def check_runtime_settings(cfg: Any) -> None:
    """Check the settings of :func:`add_runtime_arguments`' flags on a command's config, in ``__post_init__``.

    Raises:
        TypeError, ValueError: ``threads`` is not a whole number >= 1, or ``device`` is not a usable
            device (see :func:`resolve_device`); a CUDA request on a CPU-only build fails here, before any work.
    """
    from fewstep.infra.validation import check_threads  # torch and numpy: not at CLI start-up

    cfg.threads = check_threads(cfg.threads)
    resolve_device(cfg.device)


def split_overrides(argv: Sequence[str], schema: type) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` items (``key`` a field of ``schema``) from the rest of ``argv``.

    This lets overrides stand anywhere, even after a flag that takes several values
    (``--solvers ddim unipc nfe=[4]``). An argument such as a prompt that happens to
    start with ``<key>=`` can be passed as ``--prompt=...``.
    """
    keys = {f.name for f in dataclasses.fields(schema)}
    rest, overrides = [], []
    for item in argv:
        m = _OVERRIDE.match(item)
        (overrides if m and m.group(1) in keys else rest).append(item)
    return rest, overrides


def _split_top_level(text: str) -> list[str]:
    """Split ``a=1,b=[2,3]`` on the commas outside brackets and braces."""
    items, depth, start = [], 0, 0
    for k, ch in enumerate(text):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:k])
            start = k + 1
    return items + [text[start:]]


def parse_spec(spec: str, what: str = "spec") -> tuple[str, dict[str, Any]]:
    """Split ``name`` / ``name:key=value,key=value`` (solvers, feature extractors) into name and options.

    Values are JSON when they parse as JSON (``order=3``, ``corrector=false``), else strings;
    commas inside brackets stay in their value (``ratios=[1,1,0.9]``).

    Raises:
        ValueError: an item without ``=``, a repeated key, or an empty name (naming ``what``).
    """
    name, _, rest = str(spec).partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, _split_top_level(rest)):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"{what} {spec!r}: expected key=value, got {item!r}")
        if key in options:
            raise ValueError(f"{what} {spec!r} sets {key!r} twice")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value.strip()
    if not name.strip():
        raise ValueError(f"{what} {spec!r} has no name")
    return name.strip(), options


def _clip_quoted(msg: str, limit: int = 60) -> str:
    """``msg`` with every quoted value cut to ``limit`` characters: an error never echoes a whole file."""
    return re.sub(r"'([^'\n]{%d,})'" % (limit + 1), lambda m: repr(m.group(1)[:limit] + "..."), msg)


def _format_omegaconf_error(exc: Exception, source: str) -> str:
    lines = str(exc).splitlines()
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.strip().startswith("full_key:")), "")
    msg = lines[0] if lines else type(exc).__name__
    msg = msg.replace("AnyNode is not a ListConfig, TupleConfig, list, or tuple", "expected a list")
    return _clip_quoted(f"{source}: {msg}" + (f" (key '{key}')" if key and f"'{key}'" not in msg else ""))


def _yaml_error(path: Path, exc: Exception) -> str:
    """Where and what the YAML error is, without the snippet of the file PyYAML quotes."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or type(exc).__name__
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{path} is not valid YAML: {problem}{where}"


def _check_setting_names(path: Path, data: Any) -> None:
    """Refuse a file whose top-level keys cannot be setting names (any text file parses as YAML)."""
    keys = list(data.keys())
    bad = [k for k in keys if not (isinstance(k, str) and re.fullmatch(r"[A-Za-z_]\w{0,63}", k))]
    if bad:
        raise ValueError(f"{path} is not a settings file: {len(bad)} of its {len(keys)} top-level key(s) are not "
                         "setting names (expected 'key: value' lines)")


def _list_keys(schema: type) -> set[str]:
    hints = typing.get_type_hints(schema)
    out = set()
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        if any(typing.get_origin(a) in (list, tuple) for a in args):
            out.add(f.name)
    return out


def _parse_overrides(overrides: Iterable[str], schema: type) -> Any:
    import yaml
    from omegaconf import OmegaConf

    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o or not _OVERRIDE.match(o)]
    if bad:
        raise ValueError(f"expected key=value, got {bad[0]!r}")
    try:
        dot = OmegaConf.from_dotlist(overrides)
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot parse {' '.join(overrides)!r}: {str(exc).splitlines()[0]}") from None
    for key in _list_keys(schema) & set(dot.keys()):
        value = dot[key]
        if value is not None and not OmegaConf.is_list(value):
            dot[key] = [value]  # nfe=8 means [8]
    return dot


def _check_code_settings(schema: type, layers: list[tuple[str, Any]]) -> None:
    """Settings files are data: a value that would import and call code (``schema.imports_code(key, value)``,
    e.g. an extractor given as ``package.module:callable``) may come from the command line, or from a
    file only when ``allow_code=true`` is given on the command line (a file cannot allow itself)."""
    imports_code = getattr(schema, "imports_code", None)
    if imports_code is None or not layers or layers[0][0] in ("command line", "key=value overrides"):
        return
    (path, data), command_line = layers[0], layers[1:]
    if any(bool(layer.get("allow_code", False)) for _, layer in command_line):
        return
    for key in data.keys():
        if any(key in layer for _, layer in command_line):
            continue  # the command line's value wins
        value = data[key]
        if isinstance(value, str) and imports_code(key, value):
            raise ValueError(_clip_quoted(
                f"{path}: {key} '{value}' imports and calls Python code, which a settings file may do only with "
                f"allow_code=true on the command line (or give {key} on the command line)"))


def load_config(schema: type[T], path: str | Path | None = None, flags: dict[str, Any] | None = None,
                overrides: Iterable[str] = (), flags_source: str = "command line") -> T:
    """Build a validated ``schema`` instance from the layers (no argparse needed).

    Args:
        schema: The command's dataclass.
        path: Optional YAML file (a mapping of schema keys).
        flags: Values of the flags that were given, keyed by schema key.
        overrides: OmegaConf dotlist items, applied last.
        flags_source: How messages name the ``flags`` layer (an API passes its arguments there).

    Returns:
        An instance of ``schema`` (its ``__post_init__`` has run).

    Raises:
        ValueError: unreadable or malformed file, unknown key, wrong type, missing value,
            or whatever ``__post_init__`` rejects; the message names the file and key.
        OSError: the file cannot be read.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")  # OSError names the file
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not a UTF-8 text file (byte {exc.start})") from None
        try:
            data = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
        except yaml.YAMLError as exc:
            raise ValueError(_yaml_error(path, exc)) from None
        except OmegaConfBaseException as exc:  # e.g. keys YAML allows but OmegaConf does not
            raise ValueError(f"{path} is not a settings file ({type(exc).__name__})") from None
        if not OmegaConf.is_dict(data):
            raise ValueError(f"{path} must hold a mapping of settings (key: value), got a {type(data).__name__}")
        _check_setting_names(path, data)
        layers.append((str(path), data))
    if flags:
        layers.append((flags_source, OmegaConf.create(dict(flags))))
    overrides = list(overrides)
    if overrides:
        layers.append(("key=value overrides", _parse_overrides(overrides, schema)))
    _check_code_settings(schema, layers)
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise ValueError(_format_omegaconf_error(exc, source)) from None
        except TypeError:  # a mapping where the schema has a list (or the reverse): OmegaConf names no key
            raise ValueError(_container_mismatch(merged, layer, source)) from None
    _check_int_range(merged)
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ValueError(_format_omegaconf_error(exc, "config")) from None
    except TypeError as exc:  # __post_init__ type checks
        raise ValueError(str(exc)) from None


def _container_mismatch(merged: Any, layer: Any, source: str) -> str:
    """Name the first key of ``layer`` whose container type does not fit the schema."""
    from omegaconf import OmegaConf

    for key in layer:
        try:
            OmegaConf.merge(merged, {key: layer[key]})
        except Exception:  # noqa: BLE001 - this key is the culprit, whatever OmegaConf raises
            expected = "a list" if OmegaConf.is_list(merged.get(key)) else "a mapping" \
                if OmegaConf.is_dict(merged.get(key)) else "a single value"
            return f"{key}: {source} gives {type(layer[key]).__name__}, the setting takes {expected}"
    return f"{source}: a value does not fit its setting's type"


_INT64 = (-(2**63), 2**63 - 1)


def _check_int_range(cfg: Any) -> None:
    """Whole numbers must fit 64 bits (seeds, counts): say which key, not "Overflow when unpacking long long"."""
    from omegaconf import OmegaConf

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"{key}={value} is out of range: whole-number settings must lie in "
                             f"[{_INT64[0]}, {_INT64[1]}]")

    walk(OmegaConf.to_container(cfg), "")


def resolve_config(schema: type[T], args: argparse.Namespace) -> T:
    """The validated config of a command: defaults < ``--config`` < given flags < overrides.

    Args:
        schema: The command's dataclass (the one passed to :func:`add_config_arguments`).
        args: The parsed namespace.

    Returns:
        An instance of ``schema``.

    Raises:
        ValueError: see :func:`load_config`.
    """
    keys = {f.name for f in dataclasses.fields(schema)}
    flags = {k: v for k, v in vars(args).items() if k not in _RESERVED and not k.endswith("_command")}
    stray = sorted(set(flags) - keys)
    if stray:  # a programming error in the parser, not a user mistake
        raise RuntimeError(f"flags {stray} have no key in {schema.__name__}")
    return load_config(schema, getattr(args, "config", None), flags, getattr(args, "overrides", ()))


def save_config(cfg: Any, directory: str | Path, name: str = CONFIG_NAME) -> Path:
    """Write the resolved config atomically as YAML beside a run's results.

    Returns:
        The path written (``directory/config.yaml``).
    """
    from omegaconf import OmegaConf

    from fewstep.infra.io import atomic_write_bytes

    path = Path(directory) / name
    atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode())
    return path


def resolve_device(name: str):
    """A ``torch.device`` for a ``--device`` value, checked before any work starts.

    Raises:
        ValueError: not a device name, or the device is not usable here (a CUDA request on a
            CPU-only torch build says so).
    """
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device {name!r}: this torch build ({torch.__version__}) has no CUDA support; "
                             "install a CUDA build of torch (see docs/install.md) or use cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: torch was built with CUDA but finds no usable GPU "
                             "(driver or CUDA_VISIBLE_DEVICES); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r}: MPS is not available on this machine; use cpu")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or mps")
    return device


def refuse_multiple_processes(command: str) -> None:
    """Stop a command that runs as one process when it is launched by ``torchrun`` / ``accelerate launch``.

    Every rank would run the whole job and collide on the output folder's lock; rank 0 reports it
    (one line), the other ranks exit quietly with the same status.

    Raises:
        ValueError: on rank 0 of a multi-process launch.
        SystemExit: (status 2) on the other ranks.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        if int(os.environ.get("RANK", "0") or 0) != 0:
            raise SystemExit(2)
        raise ValueError(f"{command} runs as one process; run it without torchrun / accelerate launch "
                         f"(WORLD_SIZE={os.environ['WORLD_SIZE']})")


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run a command body with ``threads`` torch CPU threads, then restore the count (main() may run in-process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
