"""DotTree: a tree of named leaves addressed by dot-separated keys (``"layer.0.weight"``)."""
import re
from typing import Callable, Dict, Generic, Iterable, List, Tuple, TypeVar, Union

L = TypeVar("L")
K = TypeVar("K")
V = TypeVar("V")

Key = Union[str, int]


def sanitise(name: str) -> str:
    """``name`` with every character that cannot appear in a python identifier replaced by ``_``."""
    return re.sub(r"\W|^(?=\d)", "_", name)


def to_mapping(key: "DotTree[K]", value: "DotTree[V]") -> Dict[K, V]:
    """``{key leaf: value leaf}`` for every flat name the two trees share."""
    keys, values = key.to_dict(), value.to_dict()
    return {keys[name]: values[name] for name in keys if name in values}


class DotTree(Generic[L]):
    """A tree whose nodes are named children; leaves are any value that is not a DotTree.

    ``tree.a.b``, ``tree["a"]["b"]`` and ``tree.to_dict()["a.b"]`` address the same leaf. Integer keys
    are stored as strings (``tree[0]`` == ``tree["0"]``); negative integers count back from the
    largest numeric key.
    """

    def __init__(self, **kwargs: Union[L, "DotTree[L]"]):
        self._map: Dict[str, Union[L, "DotTree[L]"]] = {}
        for k, v in kwargs.items():
            self.insert(k, v)

    # --- access
    def __getattr__(self, key: str):
        if key.startswith("__") or key == "_map":
            raise AttributeError(key)
        try:
            return self.get(key)
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no key or attribute {key!r}; keys: "
                                 f"{self.keys()}") from None

    def __getitem__(self, key: Key):
        return self.get(key)

    def __contains__(self, key: Key) -> bool:
        try:
            self.get(key)
        except KeyError:
            return False
        return True

    def get(self, key: Key):
        """The child or leaf at ``key`` (a single name, or dotted to reach into nested trees)."""
        if isinstance(key, int) or (isinstance(key, str) and key.lstrip("-").isdigit()):
            return self._map[self._numeric_key(int(key))]
        head, _, rest = key.partition(".")
        if head not in self._map:
            raise KeyError(f"{type(self).__name__} has no key {head!r}; keys: {self.keys()}")
        node = self._map[head]
        if not rest:
            return node
        if not isinstance(node, DotTree):
            raise KeyError(f"key {key!r}: {head!r} is a leaf, not a tree")
        return node.get(rest)

    def _numeric_key(self, key: int) -> str:
        if key < 0:
            numeric = [int(k) for k in self._map if k.isdigit()]
            if not numeric:
                raise KeyError(f"negative key {key}: {type(self).__name__} has no numeric keys")
            key = max(numeric) + 1 + key
        if str(key) not in self._map:
            raise KeyError(f"{type(self).__name__} has no key {key}; keys: {self.keys()}")
        return str(key)

    # --- mutation
    def insert(self, key: Key, value, overwrite: bool = False) -> None:
        """Sets ``key`` to ``value``; a dotted key creates nested trees on the way.

        Raises ValueError if ``key`` exists (unless ``overwrite``) or is not an identifier/number.
        """
        if isinstance(key, int):
            if key < 0:
                raise ValueError(f"numeric key cannot be negative: {key}")
            key = str(key)
        parts = key.split(".")
        node = self
        for part in parts[:-1]:
            node._check_key(part)
            child = node._map.get(part)
            if not isinstance(child, DotTree):
                if child is not None and not overwrite:
                    raise ValueError(f"key {key!r}: {part!r} already exists as a leaf")
                child = node._map[part] = type(self)()
            node = child
        last = parts[-1]
        node._check_key(last)
        if last in node._map and not overwrite:
            raise ValueError(f"key {key!r} already exists")
        node._map[last] = value

    def update(self, values: "DotTree[L]", overwrite: bool = False) -> None:
        """Inserts every top-level entry of ``values``."""
        for k, v in values.copy()._map.items():
            self.insert(k, v, overwrite)

    def pop(self, key: Key):
        return self._map.pop(str(key))

    def filter_keys(self, keys: Iterable[Key]) -> "DotTree[L]":
        """A new tree holding only the top-level entries ``keys``."""
        tree = type(self)()
        for k in keys:
            tree.insert(k, self.get(k))
        return tree

    def copy(self):
        """A copy of the tree structure; leaves are shared."""
        tree = type(self)()
        for k, v in self._map.items():
            tree._map[k] = v.copy() if isinstance(v, DotTree) else v
        return tree

    def _clear(self) -> None:
        """Removes every leaf, keeping (now empty) subtrees: subtrees may be shared with sub-modules."""
        for k, v in list(self._map.items()):
            if isinstance(v, DotTree):
                v._clear()
            else:
                del self._map[k]

    @staticmethod
    def _check_key(key: str) -> None:
        if not key.isdigit() and not key.isidentifier():
            raise ValueError(f"{key!r} is not a valid key: use python identifiers or non-negative integers")

    # --- views
    def keys(self) -> List[str]:
        return list(self._map)

    def values(self) -> list:
        return list(self._map.values())

    def keys_flat(self) -> List[str]:
        return list(self.to_dict())

    def values_flat(self) -> list:
        return list(self.to_dict().values())

    def len(self) -> int:
        return len(self._map)

    def len_flat(self) -> int:
        return len(self.to_dict())

    def to_dict(self) -> Dict[str, L]:
        """Flat ``{dotted name: leaf}`` in insertion order."""
        flat = {}
        for k, v in self._map.items():
            if isinstance(v, DotTree):
                flat.update({f"{k}.{name}": leaf for name, leaf in v.to_dict().items()})
            else:
                flat[k] = v
        return flat

    def to_mapping(self, values: "DotTree[V]") -> Dict[L, V]:
        """``{leaf of self: leaf of values}`` for the flat names both trees have."""
        return to_mapping(self, values)

    @classmethod
    def from_dict(cls, d: Dict[Key, L]):
        """A tree from ``{dotted name: leaf}``."""
        tree = cls()
        for k, v in d.items():
            tree.insert(k, v)
        return tree

    def unpack(self) -> Tuple[Tuple[str, ...], Tuple[L, ...]]:
        """``(names, leaves)`` sorted by flat name."""
        items = sorted(self.to_dict().items(), key=lambda kv: kv[0])
        return tuple(k for k, _ in items), tuple(v for _, v in items)

    @classmethod
    def pack(cls, keys: Iterable[Key], values: Iterable[L]):
        """The inverse of :meth:`unpack`."""
        keys, values = list(keys), list(values)
        if len(keys) != len(values):
            raise ValueError(f"pack: {len(keys)} keys for {len(values)} values")
        return cls.from_dict(dict(zip(keys, values)))

    def map(self, fn: Callable[[L], V]):
        """A tree of the same names with ``fn`` applied to every leaf."""
        return type(self).from_dict({k: fn(v) for k, v in self.to_dict().items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"
