"""Options several commands share (--run, --base, --device, --json), and `config_options`, which makes a
command's options from a config dataclass's fields, so a setting is declared once, with its help, in the
dataclass (kalmkg/training/config.py) and the command line follows it."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

DEVICE_HELP = "auto, cpu, cuda, cuda:1, mps."


def click_module():
    """The click that parses our command line: recent typer releases vendor their own copy."""
    try:
        from typer import _click as click
    except ImportError:
        import click
    return click


def json_option(help: str = "Print the result as JSON.") -> Any:
    return typer.Option(False, "--json", help=help)


def run_option(help: str = "Run id.") -> Any:
    return typer.Option(None, "--run", "-r", help=help, show_default="the latest run")


def base_option(help: str) -> Any:
    return typer.Option(None, "--base", "-b", help=help)


def device_option(default: str = "auto", help: str = DEVICE_HELP) -> Any:
    return typer.Option(default, "--device", help=help)


def precision_option() -> Any:
    return typer.Option("auto", "--precision",
                        help="The torch backend's weights: auto (bf16 on a CUDA GPU that runs it natively, else "
                             "fp32), fp32, bf16 (half the memory; vectors within about 1e-2 of fp32's).")


def backend_option(help: str = "torch, or gguf (the run's `kalmkg export` through llama.cpp).") -> Any:
    return typer.Option("torch", "--backend", help=help)


def gguf_option() -> Any:
    return typer.Option(None, "--gguf", help="With --backend gguf: which export (models/<name>.gguf).",
                        show_default="the run's newest")


# ------------------------------------------------------------------ options from a config dataclass
@dataclasses.dataclass(frozen=True)
class FieldOption:
    """How one config field appears on the command line: its parameter for typer, and the value back."""

    name: str
    annotation: Any  # what typer parses: the field's type, or str for a comma-separated tuple
    option: Any  # the typer.Option
    listed: bool  # a tuple of strings, given as one comma-separated value

    def value(self, given):
        return tuple(t.strip() for t in given.split(",") if t.strip()) if self.listed else given


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _optional_of(field_type):
    """X for a field typed `X | None`, else None."""
    args = typing.get_args(field_type)
    if len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def field_option(field: dataclasses.Field, field_type, short: Optional[str] = None) -> FieldOption:
    """A dataclass field as an option: --kebab-case, its default, its metadata's help and group (the help
    panel). A bool gets --x/--no-x whatever its default, so either value can override a --config file."""
    name = option_name(field.name)
    listed = typing.get_origin(field_type) is tuple
    if listed:
        if typing.get_args(field_type) != (str, ...):
            raise TypeError(f"{field.name}: only tuple[str, ...] fields become options, not {field_type}")
        annotation, default = str, ",".join(field.default)
    elif field_type in (bool, int, float, str):
        annotation, default = field_type, field.default
    elif _optional_of(field_type) in (int, float, str) and field.default is None:
        annotation, default = Optional[_optional_of(field_type)], None  # unset: the config fills it in
    else:
        raise TypeError(f"{field.name}: no command-line option for a field of type {field_type}")
    if annotation is bool:
        name = f"{name}/--no-{name[2:]}"
    decls = (name,) if short is None else (name, short)
    option = typer.Option(default, *decls, help=field.metadata.get("help"),
                          rich_help_panel=field.metadata.get("group"))
    return FieldOption(field.name, annotation, option, listed)


def config_options(config_cls, *, param: str = "config", short: Optional[dict[str, str]] = None,
                   from_file: Optional[str] = None) -> Callable:
    """Decorate a command that takes `param: config_cls`: typer then sees one option per field of
    config_cls in that parameter's place, and the command gets them back as one config_cls, which checks
    its values when it is made. The command's other parameters stay as they are. With `from_file` (a
    TOML table's name, e.g. "train") the command also takes `--config FILE.toml`: the file's values
    (that table, or the file's top level) replace the defaults, and options given on the command line
    replace the file's."""

    def decorate(command: Callable) -> Callable:
        field_types = typing.get_type_hints(config_cls)
        options = [field_option(f, field_types[f.name], (short or {}).get(f.name))
                   for f in dataclasses.fields(config_cls)]
        hints = typing.get_type_hints(command)
        own = inspect.signature(command).parameters
        if param not in own:
            raise TypeError(f"{command.__name__} has no parameter '{param}' to fill from {config_cls.__name__}")
        clash = sorted({o.name for o in options} & set(own))
        if clash:
            raise TypeError(f"{command.__name__}: parameters {clash} are also fields of {config_cls.__name__}")
        if from_file is not None and "ctx" not in own:
            raise TypeError(f"{command.__name__} needs a `ctx: typer.Context` parameter to read --config")

        parameters = []
        for p in own.values():
            if p.name == param:
                if from_file is not None:
                    parameters.append(inspect.Parameter(
                        CONFIG_FILE, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                        default=typer.Option(None, "--config", help=f"A TOML file of these settings (its [{from_file}] "
                                             "table, e.g. a run's config.toml); options given here override it.")))
                parameters += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.option,
                                                 annotation=o.annotation) for o in options]
            else:
                parameters.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                                            annotation=hints.get(p.name, p.annotation)))

        def with_config(**given):
            path = given.pop(CONFIG_FILE, None)
            values = {o.name: o.value(given.pop(o.name)) for o in options}
            if path is not None:  # the context (a `ctx` parameter) says which options the command line gave
                values.update(_values_from_file(path, from_file, config_cls, given["ctx"], {o.name for o in options}))
            return command(**given, **{param: config_cls(**values)})

        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(with_config, attr, getattr(command, attr))
        with_config.__signature__ = inspect.Signature(parameters)
        with_config.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_config

    return decorate


CONFIG_FILE = "config_file"


def _values_from_file(path: Path, table: str, config_cls, ctx, typed: set[str]) -> dict[str, Any]:
    """The settings of a TOML file that the command line did not give: a key the config does not have,
    or a file that is not TOML, is one error line."""
    from kalmkg.errors import KalmkgError
    from kalmkg.runs import read_toml

    data = read_toml(path)
    values = data.get(table, data)
    if not isinstance(values, dict):
        raise KalmkgError(f"{path}: [{table}] is not a table of settings")
    unknown = sorted(set(values) - typed)
    if unknown:
        raise KalmkgError(f"{path}: unknown {config_cls.__name__} settings {', '.join(unknown)} "
                          f"(see `--help` for the settings there are)")
    given = {name for name in typed if ctx.get_parameter_source(name).name in ("COMMANDLINE", "ENVIRONMENT")}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k not in given}
