"""The YAML that recipes and other hand-written project files are read as, and written as.

Why its own reader: PyYAML reads YAML 1.1, where 010 is octal, yes is true and 2024-01-31 a date, and the meaning of
merge keys changed between its releases. Recipes are read by YAML 1.2's plain-scalar rules (numbers in decimal only),
with merges applied here, and a key written twice is refused, so a recipe reads one way whatever PyYAML is
installed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"
_Pairs = list[tuple[yaml.Node, yaml.Node]]
_Keyed = tuple[yaml.Node, yaml.Node | None]  # a key node and the << that merged it in (None: the mapping's own)
_KINDS = {"sequence": "list", "mapping": "mapping"}  # a node's kind as a key error names it


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one, and applies merge keys
    (``<<``) itself.

    Why merges here: PyYAML's ``flatten_mapping`` rewrites nodes in place and its rules changed between releases
    (6.0.4 keeps the first of the merged keys it takes for equal, by the identity of their text), so an anchor defined
    inside a merge and aliased again read differently by version. Building each mapping's pairs afresh, without
    changing any node, gives the YAML merge-key rules on every PyYAML: a mapping's own keys override merged ones, and
    of several merged mappings (``<<: [*a, *b]``) the earlier wins."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(None, None, f"expected a mapping node, but found {node.id}",
                                                    node.start_mark)
        merged = self.__dict__.setdefault("_merged", {})  # per load: its nodes all live until it ends
        flat = yaml.MappingNode(node.tag, _merged_pairs(node, (), merged, self._key), node.start_mark, node.end_mark,
                                node.flow_style)
        return yaml.constructor.BaseConstructor.construct_mapping(self, flat, deep=deep)

    def _key(self, key_node: yaml.Node) -> Any:
        """A mapping key as the mapping will hold it (built once: the build reuses it), so that keys are compared as
        the mapping compares them."""
        key = self.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"a {_KINDS.get(key_node.id, key_node.id)} cannot be a key (keys are text, numbers, "
                "true/false or null); quote it to make it text", key_node.start_mark) from None
        return key

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """Not used: :meth:`construct_mapping` merges without changing the node (this would rewrite it in place)."""
        raise NotImplementedError("_StrictLoader merges in construct_mapping")


def _is_merge(key_node: yaml.Node) -> bool:
    """A merge key: ``<<`` written plain (the resolver tags it; a quoted '<<' or ``!!str <<`` is an ordinary key)."""
    return key_node.tag == _MERGE_TAG


def _shown(key_node: yaml.Node) -> str:
    """A key as an error names it: text quoted, anything else as written (1.0, true, ~)."""
    if key_node.tag == _STR_TAG:
        return repr(key_node.value)
    return (key_node.value or "null") if isinstance(key_node, yaml.ScalarNode) else key_node.id


def _check_own_keys(node: yaml.MappingNode, key_of: Callable[[yaml.Node], Any]) -> None:
    """A key written twice in one mapping (a second ``<<`` included) is refused, and so are two keys that the mapping
    would hold as one (1 and 1.0, 1 and true, ~ and null): either way one value was lost without a word. Keys a merge
    brings in are defaults that the mapping's own keys override, which is what merge keys are for: they are compared
    in :func:`_merged_pairs`, and refused only where Python would take two YAML keys for one (1 and true)."""
    first: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = ("merge",) if _is_merge(key_node) else ("key", key_of(key_node))
        if key in first:
            earlier = first[key]
            line = earlier.start_mark.line + 1
            if _is_merge(key_node):
                msg = f"duplicate key '<<' (first set on line {line}); merge several mappings with one <<: [*a, *b]"
            elif _shown(earlier) == _shown(key_node):
                msg = f"duplicate key {_shown(key_node)} (first set on line {line})"
            else:
                msg = (f"duplicate key {_shown(key_node)} (first set on line {line} as {_shown(earlier)}, which reads "
                       "as the same key)")
            raise yaml.constructor.ConstructorError(None, None, msg, key_node.start_mark)
        first[key] = key_node


def _merged_pairs(node: yaml.MappingNode, inside: tuple[int, ...], merged: dict[int, _Pairs],
                  key_of: Callable[[yaml.Node], Any]) -> _Pairs:
    """A mapping's key/value node pairs with its merge keys applied, each key once with the value that wins: a
    mapping's own keys over merged ones, an earlier merge source over a later one. ``inside`` holds the mappings
    being merged into (a mapping that merges itself is refused, not recursed on); ``merged`` remembers each mapping's
    result for the load, so a source merged many times (``<<: [*a, *a]`` chains) is worked out once; ``key_of`` builds a
    key, to compare keys as the mapping will."""
    if id(node) in merged:
        return merged[id(node)]
    _check_own_keys(node, key_of)
    inside = (*inside, id(node))
    sources: list[tuple[yaml.Node, yaml.MappingNode]] = []  # (the << that brings it, a mapping merged)
    own: _Pairs = []
    for key_node, value_node in node.value:
        if not _is_merge(key_node):
            own.append((key_node, value_node))
            continue
        for source in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
            if not isinstance(source, yaml.MappingNode):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"expected a mapping or list of mappings for merging, but found {source.id}", source.start_mark)
            if id(source) in inside:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "a mapping cannot merge itself (<<: an alias of "
                    "the mapping it is in)", key_node.start_mark)
            sources.append((key_node, source))
    winners: dict[Any, tuple[yaml.Node, yaml.Node, yaml.Node | None]] = {}  # key -> (key node, value node, via)
    # the last written wins, as when a mapping is built: later sources first, own keys last. A key is kept once, where
    # it first came, with the value that wins (1 and +1 are one key); keys that are two in YAML are refused if Python
    # holds them as one (1 and true), since the mapping would keep the key of one and the value of the other
    for via, pairs in [*((via, _merged_pairs(source, inside, merged, key_of)) for via, source in reversed(sources)),
                       (None, own)]:
        for key_node, value_node in pairs:
            key = key_of(key_node)
            if key in winners and winners[key][0].tag != key_node.tag:
                earlier_node, _, earlier_via = winners[key]
                raise _clash((key_node, via), (earlier_node, earlier_via))
            winners[key] = (key_node, value_node, via)
    merged[id(node)] = result = [(key_node, value_node) for key_node, value_node, _ in winners.values()]
    return result


def _origin(keyed: _Keyed) -> str:
    """Where a key comes from, as an error names it: its line, and the merge that brought it."""
    key_node, via = keyed
    line = f"line {key_node.start_mark.line + 1}"
    return line if via is None else f"{line}, merged by the << on line {via.start_mark.line + 1}"


def _clash(key: _Keyed, other: _Keyed) -> yaml.constructor.ConstructorError:
    """Two keys of a mapping, one at least merged in, that YAML holds apart (their tags differ: 1 and true, 1 and
    1.0) and Python as one: no merge rule says which value the mapping keeps. Pointed at the key that would win, or
    at the << that brought it."""
    return yaml.constructor.ConstructorError(
        None, None, f"keys {_shown(key[0])} ({_origin(key)}) and {_shown(other[0])} ({_origin(other)}) read as the "
        "same key, so one value would be lost; change one of them or quote it (a quoted key is text)",
        (key[1] or key[0]).start_mark)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    return loader.construct_mapping(node, deep=True)  # keys checked and merges applied by _merged_pairs


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# Plain scalars are read as YAML 1.2's core schema reads them, not as PyYAML's YAML 1.1 does: null, true/false,
# numbers, and text for everything else; except that numbers are decimal only and underscores may group digits.
# - Numbers are decimal. YAML 1.1 read 010 as octal 8, 0x10 as 16, 0b10 as 2 and 1:30 as 90 (base 60); YAML 1.2
#   reads 010 as 10 and 0x10 as 16. Such scalars stay text, so a number field names its key (the recipe's error says
#   why) and a text field (a revision 0123456) keeps what was written. YAML 1.1 also needed a dot and a signed
#   exponent (1.0e-5) and read 1e-5 or 1.5e5 as text; both are numbers here. Underscores group digits as in Python
#   (10_000; not 1_ or 1__0).
# - Only true and false are booleans. YAML 1.1 also read yes/no/on/off as booleans, so a column, family or stage
#   named "no" or "on" became false or true.
# - No dates: YAML 1.1 read 2024-01-31 as a date, which no recipe field holds; it is text.
# - "=" and "<<" as values are text (YAML 1.1 gave them tags that SafeLoader cannot build); a plain << key merges.
# - An explicit tag reads no more than a plain scalar of its kind would: !!int 010 or 0x1F, !!bool yes and !!null x
#   are refused, not read YAML 1.1's way (8, 31, true) or dropped (x), and !!float takes any decimal number (1e3,
#   1). !!timestamp is refused: dates are text here, and the tag asks for something no field holds.
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_BOOL_TAG, _TIMESTAMP_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp"
_NULL_TAG = "tag:yaml.org,2002:null"
_VALUE_TAG = "tag:yaml.org,2002:value"  # YAML 1.1's "=", which SafeLoader cannot build as a value
_DIGITS = r"[0-9](?:_?[0-9])*"
_DECIMAL_INT = re.compile(r"^[-+]?(?:0|[1-9](?:_?[0-9])*)$")
_DECIMAL_FLOAT = re.compile(rf"^(?:[-+]?(?:{_DIGITS}\.(?:{_DIGITS})?|\.{_DIGITS}|{_DIGITS}(?=[eE]))(?:[eE][-+]?[0-9]+)?"
                            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_TRUE_OR_FALSE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in (_INT_TAG, _FLOAT_TAG, _BOOL_TAG, _TIMESTAMP_TAG, _VALUE_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(_INT_TAG, _DECIMAL_INT, list("-+0123456789"))
_StrictLoader.add_implicit_resolver(_FLOAT_TAG, _DECIMAL_FLOAT, list("-+0123456789."))
_StrictLoader.add_implicit_resolver(_BOOL_TAG, _TRUE_OR_FALSE, list("tTfF"))
_StrictLoader.add_constructor(_MERGE_TAG, yaml.constructor.SafeConstructor.construct_yaml_str)  # << as a value: text
_NULL = re.compile(r"~|null|Null|NULL|")
_DECIMAL_NUMBER = re.compile(f"{_DECIMAL_INT.pattern}|{_DECIMAL_FLOAT.pattern}")  # what !!float reads: 1 too


def _scalar_text(loader: _StrictLoader, node: yaml.Node, form: re.Pattern[str], needs: str, fix: str) -> str:
    """A scalar's text, refused unless all of it has ``form``: what a plain scalar of its tag's kind is read from.
    Plain scalars were resolved by the same forms; this catches text a tag was put on explicitly (!!int x), which
    SafeLoader read YAML 1.1's way (!!int 010 as 8) or failed on with a KeyError or ValueError."""
    text = loader.construct_scalar(node)
    if not form.fullmatch(text):
        raise yaml.constructor.ConstructorError(
            None, None, f"!!{node.tag.rsplit(':', 1)[-1]} needs {needs}, got {text!r}; {fix}", node.start_mark)
    return text


def _construct_null(loader: _StrictLoader, node: yaml.Node) -> None:
    _scalar_text(loader, node, _NULL, "null, ~ or nothing", "drop the tag to keep the text")


def _construct_bool(loader: _StrictLoader, node: yaml.Node) -> bool:
    fix = "write true or false (yes, no, on and off are text here)"
    return _scalar_text(loader, node, _TRUE_OR_FALSE, "true or false", fix).lower() == "true"


def _construct_int(loader: _StrictLoader, node: yaml.Node) -> int:
    fix = "write it in decimal, with no leading 0 (10, -3, 1_000), or drop the tag to keep the text"
    text = _scalar_text(loader, node, _DECIMAL_INT, "a decimal integer", fix)
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits), a ValueError traceback
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(text)} characters is too long to read as a number; quote it to keep it "
            "as text", node.start_mark) from None


def _construct_float(loader: _StrictLoader, node: yaml.Node) -> float:
    fix = "write it in decimal (1.5, -2, 1e-3, .inf, .nan), or drop the tag to keep the text"
    _scalar_text(loader, node, _DECIMAL_NUMBER, "a decimal number", fix)
    return yaml.constructor.SafeConstructor.construct_yaml_float(loader, node)


def _construct_timestamp(loader: _StrictLoader, node: yaml.Node) -> None:
    """Refused, not read as text: the tag asks for a date, which nothing read from these files holds."""
    text = loader.construct_scalar(node)
    raise yaml.constructor.ConstructorError(
        None, None, f"!!timestamp is not read here (dates are text); drop the tag to keep {text!r} as text",
        node.start_mark)


_StrictLoader.add_constructor(_NULL_TAG, _construct_null)
_StrictLoader.add_constructor(_BOOL_TAG, _construct_bool)
_StrictLoader.add_constructor(_INT_TAG, _construct_int)
_StrictLoader.add_constructor(_FLOAT_TAG, _construct_float)
_StrictLoader.add_constructor(_TIMESTAMP_TAG, _construct_timestamp)


def parse_strict_yaml(text: str) -> Any:
    """YAML as recipes read it: plain scalars by YAML 1.2's core schema (010 or yes stay text), a key written twice
    refused. For the project's other hand-written YAML too (evaluation suites), so that a seed reads the same
    everywhere. Every problem is a ``yaml.YAMLError``, nesting too deep for Python's stack included."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply to read (hundreds of levels of mappings, lists or merges); flatten "
                             "it") from None


_STRICT_RESOLVER = yaml.resolver.BaseResolver()  # resolves plain scalars as _StrictLoader does
_STRICT_RESOLVER.yaml_implicit_resolvers = _StrictLoader.yaml_implicit_resolvers


class _PortableDumper(yaml.SafeDumper):
    """Writes text plain only where both readers read it back as text: this project's loader (YAML 1.2 scalars) and
    PyYAML's ``safe_load`` (YAML 1.1). SafeDumper alone wrote a text 1.5e5 plain, which the loader reads as a number,
    so a resolved recipe.yaml would not read back as the recipe it records."""

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: tuple[bool, bool]) -> str:
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == _STR_TAG:
            return _STRICT_RESOLVER.resolve(kind, value, implicit)
        return tag


def dump_yaml(data: Any) -> str:
    """``data`` as block YAML in the order given, which reads back equal with :func:`parse_strict_yaml` and with
    ``yaml.safe_load``. ASCII, non-ASCII text escaped: written as UTF-8, a NEL (U+0085) read back as a space."""
    return yaml.dump(data, Dumper=_PortableDumper, sort_keys=False)
