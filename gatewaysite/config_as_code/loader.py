"""Reading YAML for configuration files: exact decimals, no duplicate keys, problems with paths."""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a file, at a path such as `organizations[0].routes[2].fallbacks[0]`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidConfig(Exception):
    """The file (or a change it asks for) cannot be applied; nothing was written."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__(f"{len(problems)} problem(s)")
        self.problems = list(problems)


class _ExactLoader(yaml.SafeLoader):
    """YAML's safe subset, with two changes that keep configuration honest.

    A number with a fraction (`0.15`) becomes a Decimal built from its text, so a
    price never passes through a float; and a key given twice in one mapping is an
    error instead of silently meaning the last one.
    """

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            self.flatten_mapping(node)
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if duplicate:
                    raise ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"the key {key!r} is given twice",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def _construct_decimal(loader: yaml.SafeLoader, node: ScalarNode) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ConstructorError(
            None, None, f"{text!r} is not a number this file accepts", node.start_mark
        ) from None
    if not value.is_finite():
        raise ConstructorError(None, None, "infinity and NaN are not accepted", node.start_mark)
    return value


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


def yaml_load(text: str) -> Any:
    """Parse `text`; raises InvalidConfig naming the line, never quoting the file's contents."""
    try:
        return yaml.load(text, Loader=_ExactLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "the file"
        # The problem text only: PyYAML's full message quotes the offending line.
        raise InvalidConfig([Problem(where, error.problem or "not valid YAML")]) from None
    except yaml.YAMLError:
        raise InvalidConfig([Problem("", "not valid YAML")]) from None


def _represent_decimal(dumper: yaml.SafeDumper, value: Decimal) -> yaml.Node:
    # Exact text in quotes: other YAML tools would read a bare 0.15 as a float.
    return dumper.represent_str(f"{value.normalize():f}")


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    # Short lists of plain values (names, thresholds) read best on one line.
    flow = bool(value) and all(isinstance(item, str | int | Decimal) for item in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Decimal, _represent_decimal)
_Dumper.add_representer(list, _represent_list)


def yaml_dump(document: Any) -> str:
    """YAML text for `document`, keys in the order given, decimals as exact strings."""
    return yaml.dump(
        document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False
    )


# --- Environment references: ${NAME} ---

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def env_reference_name(text: str) -> str | None:
    """NAME when `text` is exactly `${NAME}`, else None."""
    match = _REFERENCE.fullmatch(text.strip())
    return match.group(1) if match else None


class EnvProblem(Exception):
    """A reference that cannot be resolved; the message names the variable, never a value."""


def env_value(name: str, env: Mapping[str, str]) -> str:
    """The variable's value; raises EnvProblem when it is unset or empty."""
    value = env.get(name)
    if value is None:
        raise EnvProblem(f"the environment variable {name} is not set")
    if not value:
        raise EnvProblem(f"the environment variable {name} is empty")
    return value


def env_interpolate(text: str, env: Mapping[str, str]) -> str:
    """`text` with each `${NAME}` replaced by the variable's value."""
    unresolved = _REFERENCE.sub("", text)
    if "${" in unresolved:
        raise EnvProblem("write environment references as ${NAME} (letters, digits and _)")
    return _REFERENCE.sub(lambda match: env_value(match.group(1), env), text)
