"""Check every TensorRT and torch-tensorrt name the project uses against the real APIs of the versions
it supports, without a GPU.

TensorRT: the pybind11 bindings wheels (`tensorrt-cu12-bindings`, `tensorrt-cu13-bindings`, about
1.3 MB each) hold the compiled module, but not its signatures as text: the binary keeps names and
templates such as `({%}, {str}) -> %`, and pybind11 fills in the types at import. The module needs
nothing from TensorRT's own libraries (libnvinfer, libnvonnxparser, libnvinfer_plugin, absent here)
to import, only the entry points it references to exist, so it is imported in a child process against
placeholder libraries that define those symbols, and the API is read from the live module (`dir`,
the pybind11 docstring signatures, property setters, enum members). The index is cached per
release under ${XDG_CACHE_HOME:-~/.cache}/m2anet/, so only the first run downloads anything.

The project's code is then read with `ast`: every attribute reached from the `tensorrt` module,
including through variables whose type follows from a constructor, a return type, a property type,
a parameter or `self.x` annotation, or a function's return annotation, is looked up in each version,
and every call is bound to the signature (positional count, keyword names, required arguments).
Code under `if trt_major(trt.__version__) >= 11:` (or `trt_release(...) < (10, 8)`, and the
statements after such an `if` that returns) is checked only against the versions it runs on.
A value that came from TensorRT but whose type the check cannot follow, or a TensorRT-only method
called on a receiver it cannot type, is a failure unless `UNTYPED_ALLOWED` names it with a reason.

torch-tensorrt: `torch_tensorrt.compile` and `torch_tensorrt.dynamo.compile` hide unknown keywords
in `**kwargs` and ignore them, so their keywords are checked against the lists per release in
`engines/torch_tensorrt_compile.json`, for every release the pin in pyproject.toml admits.

    python3 ci/trt_conformance.py [--bindings PACKAGE==VERSION ...] [--root DIR] [FILE ...]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import operator
import os
import platform
import re
import struct
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
# The oldest TensorRT 10 and the newest TensorRT 11 on the package index; --bindings checks others.
BINDINGS = ("tensorrt-cu12-bindings==10.0.1", "tensorrt-cu13-bindings==11.4.0.106")
SCAN_DIRS = ("m2anet", "engines", "export", "bench")
TORCH_TRT_KEYWORDS = REPO / "engines" / "torch_tensorrt_compile.json"
INDEX_FORMAT = 2  # bump when the index layout changes, so cached indexes are rebuilt

# (file relative to the repository, the expression as ast.unparse writes it) -> why it is safe.
UNTYPED_ALLOWED: dict[tuple[str, str], str] = {}

# The project's helpers that turn `trt.__version__` into something a branch compares.
VERSION_FUNCS = {"trt_major": lambda v: v[0], "trt_release": lambda v: v}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}
_COMPARE |= {ast.Eq: operator.eq, ast.NotEq: operator.ne}


class IndexUnreachable(RuntimeError):
    """The package index could not be reached (tests skip on this, and only on this)."""


# ----------------------------------------------------------------------------------------------
# Getting the bindings and their index


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "m2anet"


_NETWORK_ERRORS = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Name or service not "
    r"known|Network is unreachable|Connection refused|ConnectTimeout|ReadTimeout|timed out|ProxyError"
)


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps"]
    cmd += ["--only-binary=:all:", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        if _NETWORK_ERRORS.search(result.stderr):
            raise IndexUnreachable(f"cannot reach the package index to download {requirement}: {last}")
        raise RuntimeError(
            f"pip could not download {requirement} for Python {sys.version_info[0]}.{sys.version_info[1]}"
            f" on this platform ({last}); run the check with a CPython that has a wheel, e.g. 3.11"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {requirement} gave {[w.name for w in wheels]}, expected one wheel")
    return wheels[0]


def _elf_sections(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(type, offset, size, link, entsize) of each section of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise RuntimeError("the TensorRT module is not a little-endian 64-bit ELF file: x86_64 Linux only")
    shoff, shentsize, shnum = struct.unpack_from("<Q", data, 0x28)[0], *struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(shnum):
        _, kind, _, _, off, size, link, _, _, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, shoff + i * shentsize
        )
        sections.append((kind, off, size, link, entsize))
    return sections


def _cstr(data: bytes, offset: int) -> str:
    return data[offset : data.index(b"\0", offset)].decode()


def library_needs(so: Path) -> tuple[list[str], list[str]]:
    """The NVIDIA libraries the module links against and the symbols it takes from them.

    Those are the module's undefined, global, unversioned symbols that this process cannot resolve:
    versioned ones come from the C and C++ runtimes, the Python API comes from the interpreter.
    """
    import ctypes

    process = ctypes.CDLL(None)
    data = so.read_bytes()
    sections = _elf_sections(data)
    needed: list[str] = []
    symbols: list[str] = []
    versym = next(((off, size) for kind, off, size, _, _ in sections if kind == 0x6FFFFFFF), None)
    for kind, off, size, link, entsize in sections:
        strtab = sections[link][1]
        if kind == 6:  # SHT_DYNAMIC
            for i in range(0, size, 16):
                tag, val = struct.unpack_from("<qQ", data, off + i)
                if tag == 1:  # DT_NEEDED
                    needed.append(_cstr(data, strtab + val))
        elif kind == 11:  # SHT_DYNSYM
            for i in range(1, size // entsize):
                name, info, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", data, off + i * entsize)
                version = struct.unpack_from("<H", data, versym[0] + 2 * i)[0] if versym else 1
                if shndx == 0 and info >> 4 == 1 and version & 0x7FFF <= 1:  # undefined, GLOBAL, unversioned
                    symbol = _cstr(data, strtab + name)
                    if not hasattr(process, symbol):
                        symbols.append(symbol)
    return [n for n in needed if n.startswith("libnv")], sorted(symbols)


def placeholder_library(soname: str, symbols: Iterable[str]) -> bytes:
    """A minimal x86_64 ELF shared library named `soname` whose every symbol is `return 0`.

    Written by hand so the check needs no C compiler: ELF header, a read/execute segment (SysV hash,
    symbol and string tables, three bytes of code) and a writable one holding the dynamic section,
    which the loader relocates in place.
    """
    symbols = list(symbols)
    strtab, offsets = b"\0", {}
    for name in [soname, *symbols]:
        offsets[name] = len(strtab)
        strtab += name.encode() + b"\0"
    nsym = len(symbols) + 1
    hash_off = 64 + 3 * 56
    hash_table = struct.pack(f"<{3 + nsym}I", 1, nsym, nsym - 1, 0, *range(nsym - 1))  # one bucket, a chain
    sym_off = (hash_off + len(hash_table) + 7) & ~7
    str_off = sym_off + 24 * nsym
    code_off = (str_off + len(strtab) + 15) & ~15
    code = b"\x31\xc0\xc3"  # xor eax, eax; ret
    symtab = b"\0" * 24 + b"".join(
        struct.pack("<IBBHQQ", offsets[s], 0x12, 0, 1, code_off, len(code)) for s in symbols
    )
    text_end = code_off + len(code)
    dyn_off = (text_end + 0xFFF) & ~0xFFF  # its own page: the loader writes to it
    # DT_HASH, DT_STRTAB, DT_SYMTAB, DT_STRSZ, DT_SYMENT, DT_SONAME, DT_NULL
    tags = [
        (4, hash_off),
        (5, str_off),
        (6, sym_off),
        (10, len(strtab)),
        (11, 24),
        (14, offsets[soname]),
        (0, 0),
    ]
    dynamic = b"".join(struct.pack("<qQ", tag, value) for tag, value in tags)
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, 3, 64, 0, 0)
    segments = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, text_end, text_end, 0x1000)  # PT_LOAD r-x
    segments += struct.pack("<IIQQQQQQ", 1, 6, dyn_off, dyn_off, dyn_off, len(dynamic), len(dynamic), 0x1000)
    segments += struct.pack("<IIQQQQQQ", 2, 6, dyn_off, dyn_off, dyn_off, len(dynamic), len(dynamic), 8)
    image = bytearray(dyn_off + len(dynamic))
    for off, part in [(0, header), (64, segments), (hash_off, hash_table), (sym_off, symtab)]:
        image[off : off + len(part)] = part
    for off, part in [(str_off, strtab), (code_off, code), (dyn_off, dynamic)]:
        image[off : off + len(part)] = part
    return bytes(image)


def bindings_index(requirement: str) -> dict[str, Any]:
    """The API index of one bindings release, built once and cached as JSON."""
    package, version = requirement.split("==")
    cache = cache_root() / f"{package}-{version}"
    index_path = cache / f"index-v{INDEX_FORMAT}.json"
    if index_path.is_file():
        return json.loads(index_path.read_text(encoding="utf-8"))
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise RuntimeError(
            f"reading {requirement} needs x86_64 Linux (its module and the placeholder libraries are "
            f"x86_64 ELF), not {sys.platform} {platform.machine()}: run the check on such a machine"
        )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wheel = _pip_download(requirement, work / "wheel")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(work / "site")
        module = next((work / "site" / "tensorrt_bindings").glob("tensorrt*.so"))
        libs = work / "libs"
        libs.mkdir()
        needed, symbols = library_needs(module)
        for soname in needed:
            (libs / soname).write_bytes(placeholder_library(soname, symbols))
        env = {**os.environ, "LD_LIBRARY_PATH": str(libs), "PYTHONPATH": str(work / "site")}
        result = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--dump-bindings"],
            capture_output=True,
            text=True,
            env=env,
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            raise RuntimeError(f"cannot load {wheel.name} with placeholder libraries: {last}")
        index = json.loads(result.stdout)
    if index["version"] != version:
        raise RuntimeError(f"{requirement} reports version {index['version']}")
    index["package"] = package
    cache.mkdir(parents=True, exist_ok=True)
    tmp_path = index_path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(index, sort_keys=True))
    tmp_path.replace(index_path)
    return index


# ----------------------------------------------------------------------------------------------
# Reading the live module (runs in the child process, against the placeholder libraries)

# module paths and C++ namespaces (pybind11 writes nvonnxparser::IParserError for some) around names
_PREFIX = re.compile(r"\btensorrt(?:_bindings)?\.tensorrt\.|\btensorrt_bindings\.|\b\w+::")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and quotes (defaults such as `<Severity.WARNING: 2>`)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>" and not (ch == ">" and text[i - 1] == "-"):
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


def parse_signature(line: str, name: str) -> dict[str, Any] | None:
    """`name(self: X, a: int = 3) -> R` (pybind11's docstring form, `1. name(...)` for an overload)
    as params and return type; None for any other line. A property getter's name is empty."""
    pattern = rf"^(?:\d+\. )?{re.escape(name)}\((.*)\)\s*->\s*(.+?)\s*$"
    match = re.match(pattern, _PREFIX.sub("", line))
    if match is None:
        return None
    params, kind = [], "pos"
    for part in _split_top(match.group(1)):
        if part == "/":
            params = [[n, "posonly", d] for n, _, d in params]
            continue
        if part == "*":
            kind = "kwonly"
            continue
        name = part.partition(":")[0].split("=")[0].strip()
        if name.startswith("**"):
            params.append([name[2:], "varkw", True])
        elif name.startswith("*"):
            params.append([name[1:], "varargs", True])
            kind = "kwonly"
        else:
            # pybind11 names unnamed arguments arg0, arg1...: they cannot be passed by keyword
            this_kind = "posonly" if re.fullmatch(r"arg\d+", name) else kind
            params.append([name, this_kind, "=" in part])
    return {"params": params, "returns": match.group(2)}


def _signatures(obj: Any, name: str) -> list[dict[str, Any]]:
    doc = getattr(obj, "__doc__", None) or ""
    sigs = [s for s in (parse_signature(line, name) for line in doc.splitlines()) if s is not None]
    if sigs or not callable(obj):
        return sigs
    import inspect

    try:  # the Python functions that the package's __init__ adds (volume, nptype...)
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    kinds = {0: "posonly", 1: "pos", 2: "varargs", 3: "kwonly", 4: "varkw"}
    params = [
        [p.name, kinds[int(p.kind)], p.default is not p.empty or int(p.kind) in (2, 4)]
        for p in sig.parameters.values()
    ]
    return [{"params": params, "returns": ""}]


def _type_name(cls: type, module_name: str) -> str:
    return cls.__qualname__ if cls.__module__ == module_name else cls.__name__


def dump_bindings() -> dict[str, Any]:
    import types

    import tensorrt_bindings as trt

    native = trt.tensorrt.__name__
    classes: dict[str, Any] = {}

    def member(owner: type | None, name: str, value: Any, raw: Any) -> dict[str, Any]:
        if isinstance(value, type):
            if value.__module__ == native:
                describe(value)
            return {"kind": "class", "class": _type_name(value, native)}
        if isinstance(raw, property):
            if type(raw).__name__ == "pybind11_static_property":  # a class constant: Dims.MAX_DIMS
                return {"kind": "value", "type": _type_name(type(value), native)}
            sigs = (_signatures(raw.fget, "") or _signatures(raw.fget, name)) if raw.fget is not None else []
            returns = sigs[0]["returns"] if sigs else "?"  # "?": a type the docstrings do not give
            return {"kind": "property", "type": returns, "writable": raw.fset is not None}
        if isinstance(raw, staticmethod):
            return {"kind": "staticmethod", "sigs": _signatures(value, name)}
        if isinstance(value, types.ModuleType):
            return {"kind": "module"}
        if callable(value):
            return {"kind": "function" if owner is None else "method", "sigs": _signatures(value, name)}
        return {"kind": "value", "type": _type_name(type(value), native)}

    def describe(cls: type) -> None:
        qual = cls.__qualname__
        if qual in classes:
            return
        entry: dict[str, Any] = {"members": {}, "init": None, "enum": hasattr(cls, "__members__")}
        classes[qual] = entry
        doc = cls.__init__.__doc__ or ""  # without a pybind11 signature, it is object's: no constructor
        init_sigs = [
            s for s in (parse_signature(line, "__init__") for line in doc.splitlines()) if s is not None
        ]
        entry["init"] = init_sigs or None  # None: TensorRT creates these objects, Python cannot
        for name in dir(cls):
            if name.startswith(("__", "_pybind11")):
                continue
            raw = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), None)
            entry["members"][name] = member(cls, name, getattr(cls, name), raw)

    module: dict[str, Any] = {}
    for name in dir(trt):
        if name.startswith("__") and name != "__version__":
            continue
        value = getattr(trt, name)
        module[name] = member(None, name, value, value)
    return {"format": INDEX_FORMAT, "version": trt.__version__, "module": module, "classes": classes}


# ----------------------------------------------------------------------------------------------
# Types the static walk gives expressions


@dataclasses.dataclass(frozen=True)
class T:
    """What an expression is, as far as TensorRT goes.

    kind: module (the tensorrt module), class (a TensorRT class), inst (an instance), func (something
    callable with `sigs`), list (a list of `name` instances), unknown (came from TensorRT, type not
    followed: `name` says what), project (an instance of a class of the scanned file).
    """

    kind: str
    name: str = ""
    sigs: tuple[Any, ...] = ()
    label: str = ""  # how the failure messages name it: trt.Builder.create_network


def _optional_inner(text: str) -> str:
    text = text.strip()
    for pattern in (r"^Optional\[(.+)\]$", r"^(.+?)\s*\|\s*None$", r"^None\s*\|\s*(.+)$"):
        match = re.match(pattern, text)
        if match:
            return match.group(1).strip()
    return text


def type_from_text(text: str, index: dict[str, Any], label: str) -> T | None:
    """A signature's type text as a T; None for values that are not TensorRT's (int, str, numpy...)."""
    text = _optional_inner(text)
    classes = index["classes"]
    if text in classes:  # instances are named by their class in messages: IBuilderConfig.set_flag
        return T("inst", text, label=text)
    match = re.match(r"^(?:typing\.)?(?:List|list|collections\.abc\.Sequence|Sequence)\[(.+)\]$", text)
    if match and _optional_inner(match.group(1)) in classes:
        return T("list", _optional_inner(match.group(1)), label=_optional_inner(match.group(1)))
    tokens = set(re.findall(r"[A-Za-z_][\w.]*", text))
    if text in ("object", "?") or tokens & set(classes):
        return T("unknown", text, label=label)
    return None


# ----------------------------------------------------------------------------------------------
# Binding a call to a signature


def bind_failure(
    params: list[list[Any]], npos: int, star: bool, keywords: list[str], dstar: bool
) -> str | None:
    """Why a call with `npos` positional arguments and `keywords` cannot bind to `params`, or None."""
    positional = [p for p in params if p[1] in ("posonly", "pos")]
    varargs = any(p[1] == "varargs" for p in params)
    varkw = any(p[1] == "varkw" for p in params)
    if npos > len(positional) and not varargs:
        return f"takes at most {len(positional)} positional arguments, {npos} given"
    filled = {p[0] for p in positional[:npos]}
    for kw in keywords:
        match = next((p for p in params if p[0] == kw and p[1] in ("pos", "kwonly")), None)
        if match is None:
            if not varkw:
                names = [p[0] for p in params if p[1] in ("pos", "kwonly")]
                listed = f" (keywords: {', '.join(names) or 'none'})" if len(names) <= 12 else ""
                return f"has no keyword argument {kw!r}{listed}"
        elif kw in filled:
            return f"got {kw!r} both by position and by keyword"
        else:
            filled.add(kw)
    if star or dstar:
        return None
    missing = [p[0] for p in params if not p[2] and p[1] not in ("varargs", "varkw") and p[0] not in filled]
    if missing:
        return f"is missing required argument(s) {', '.join(missing)}"
    return None


# ----------------------------------------------------------------------------------------------
# The static walk


Returns = tuple[ast.expr, frozenset[str]]  # a return annotation and the file's names for tensorrt


@dataclasses.dataclass(frozen=True)
class Failure:
    path: str
    line: int
    name: str
    problem: str


def _imports_module(tree: ast.AST, module: str) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == module for a in node.names):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == module
        ):
            return True
    return False


def discover(root: Path, module: str) -> list[Path]:
    """Every .py file under the scanned folders that imports `module` (modules move; the list does not)."""
    found = []
    for folder in SCAN_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            if module in source and _imports_module(ast.parse(source, str(path)), module):
                found.append(path)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class Walker:
    """One file, one TensorRT version: evaluates expressions to T and records failures."""

    def __init__(
        self, rel: str, tree: ast.Module, index: dict[str, Any], returns: dict[str, Returns]
    ) -> None:
        self.rel, self.tree, self.index, self.returns = rel, tree, index, returns
        self.env: dict[str, T | None] = {}
        self.version = tuple(int(x) for x in re.findall(r"\d+", index["version"])[:3])
        self.failures: list[Failure] = []
        self.checked: set[tuple[int, str]] = set()  # (line, name) of every use found in this version
        self.untyped: set[tuple[str, str]] = set()
        self.class_attrs: dict[str, dict[str, T | None]] = {}
        # snake_case member names (execute_async_v3, set_input_shape...) say "TensorRT object" on any
        # receiver; one-word ones (name, shape, numpy, major) are too common to say anything
        self.member_names = {
            n for c in index["classes"].values() for n in c["members"] if "_" in n.strip("_")
        }
        self.member_names -= _GENERIC_NAMES

    # -- reporting

    def fail(self, node: ast.AST, name: str, problem: str) -> None:
        failure = Failure(self.rel, getattr(node, "lineno", 0), name, problem)
        if failure not in self.failures:  # tuple assignments evaluate their values twice
            self.failures.append(failure)

    def cannot_type(self, node: ast.AST, why: str) -> None:
        text = ast.unparse(node)
        if (self.rel, text) in UNTYPED_ALLOWED:
            self.untyped.add((self.rel, text))
            return
        self.fail(node, text, f"{why}: give it a type the check follows, or allow it in UNTYPED_ALLOWED")

    # -- lookups

    def lookup(self, node: ast.Attribute, base: T) -> T | None:
        attr, label = node.attr, f"{base.label}.{node.attr}"
        if base.kind == "module":
            entry = self.index["module"].get(attr)
            if entry is None:
                self.fail(node, label, "does not exist")
                return None
            self.checked.add((node.lineno, label))
            return self.from_entry(entry, label, bound=False)
        if base.kind == "class" and attr == "__init__":  # a subclass's explicit base initialiser
            init = self.index["classes"][base.name]["init"] or []
            return T("func", sigs=tuple(json.dumps(s) for s in init), label=label)
        if base.kind in ("class", "inst"):
            cls = self.index["classes"].get(base.name)
            entry = cls["members"].get(attr) if cls else None
            if entry is None:
                what = "a member of the enum" if cls and cls["enum"] else "an attribute of"
                self.fail(node, label, f"is not {what} {base.name}")
                return None
            self.checked.add((node.lineno, label))
            return self.from_entry(entry, label, bound=base.kind == "inst")
        if base.kind == "project":
            return self.class_attrs.get(base.name, {}).get(attr)
        if base.kind == "unknown":
            self.cannot_type(node, f"the type of {ast.unparse(node.value)} ({base.name}) is not followed")
        return None

    def from_entry(self, entry: dict[str, Any], label: str, bound: bool) -> T | None:
        kind = entry["kind"]
        if kind == "class":
            return T("class", entry["class"], label=label)
        if kind in ("function", "method", "staticmethod"):
            sigs = entry["sigs"]
            if bound and kind == "method":
                sigs = [{**s, "params": s["params"][1:]} for s in sigs]
            return T("func", sigs=tuple(json.dumps(s) for s in sigs), label=label)
        if kind == "property":
            return type_from_text(entry["type"], self.index, label)
        if kind == "value":
            return type_from_text(entry["type"], self.index, label)
        return None

    # -- expressions

    def call(self, node: ast.Call, func: T | None) -> T | None:
        npos = sum(not isinstance(a, ast.Starred) for a in node.args)
        star = any(isinstance(a, ast.Starred) for a in node.args)
        keywords = [k.arg for k in node.keywords if k.arg is not None]
        dstar = any(k.arg is None for k in node.keywords)
        if func is None:
            if isinstance(node.func, ast.Name) and node.func.id in self.returns:
                # the function's return annotation, read with the aliases of the file that defines it;
                # that file's own walk reports what is wrong in it
                annotation, aliases = self.returns[node.func.id]
                mark = len(self.failures)
                result = self.annotation(annotation, {a: T("module", label="trt") for a in aliases})
                del self.failures[mark:]
                return result
            return None
        if func.kind == "unknown":
            self.cannot_type(node.func, f"cannot type the callee ({func.name})")
            return None
        if func.kind == "class":
            cls = self.index["classes"][func.name]
            if cls["init"] is None:
                self.fail(node, func.label, f"{func.name} has no constructor")
                return None
            sigs = [json.dumps({**s, "params": s["params"][1:]}) for s in cls["init"]]
            result_type = T("inst", func.name, label=func.name)
            return result_type if self.bind(node, func.label, sigs, npos, star, keywords, dstar) else None
        if func.kind == "func":
            sig = self.bind(node, func.label, list(func.sigs), npos, star, keywords, dstar)
            if sig is None:
                return None
            return type_from_text(sig["returns"], self.index, f"{func.label}(...)")
        return None

    def bind(
        self, node: ast.Call, label: str, sigs: list[str], npos: int, star: bool, kws: list[str], dstar: bool
    ) -> dict[str, Any] | None:
        if not sigs:
            self.cannot_type(node.func, "no signature was found for it in the bindings")
            return None
        problems = []
        for text in sigs:
            sig = json.loads(text)
            problem = bind_failure(sig["params"], npos, star, kws, dstar)
            if problem is None:
                self.checked.add((node.lineno, f"{label}({', '.join([*['_'] * npos, *kws])})"))
                return sig
            problems.append(problem)
        self.fail(
            node,
            label,
            problems[0] if len(problems) == 1 else "no overload accepts the call: " + "; ".join(problems),
        )
        return None

    def annotation(self, node: ast.expr | None, env: dict[str, T | None] | None = None) -> T | None:
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                node = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            left, right = self.annotation(node.left, env), self.annotation(node.right, env)
            return left if left is not None else right
        if isinstance(node, ast.Subscript):  # list[trt.X], dict[int, trt.X]: indexing gives an X
            args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            element = self.annotation(args[-1], env)
            container = ast.unparse(node.value).rsplit(".", 1)[-1]
            if element is not None and container in ("list", "List", "Sequence", "dict", "Dict", "Mapping"):
                return T("list", element.name, label=element.name)
            return None
        value = self.expr(node, env)
        if value is not None and value.kind == "class":
            return T("inst", value.name, label=value.name)
        return None

    def expr(self, node: ast.expr | None, env: dict[str, T | None] | None = None) -> T | None:
        env = self.env if env is None else env
        if node is None:
            return None
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.expr(node.value, env)
            if base is None:
                if node.attr in self.member_names and not isinstance(node.ctx, ast.Store):
                    self.cannot_type(
                        node, f"{node.attr} is a TensorRT name but the check cannot type its receiver"
                    )
                return None
            return self.lookup(node, base)
        if isinstance(node, ast.Call):
            func = self.expr(node.func, env)
            args = [self.expr(arg, env) for arg in node.args]
            for keyword in node.keywords:
                self.expr(keyword.value, env)
            name = node.args[1] if len(node.args) == 2 else None  # getattr(trt.X, "Y") uses trt.X.Y
            if ast.unparse(node.func) == "getattr" and args[0] is not None and isinstance(name, ast.Constant):
                return self.lookup(ast.Attribute(node.args[0], str(name.value), lineno=node.lineno), args[0])
            return self.call(node, func)
        if isinstance(node, ast.Subscript):
            base = self.expr(node.value, env)
            self.expr(node.slice, env)
            return T("inst", base.name, label=base.name) if base and base.kind == "list" else None
        if isinstance(node, ast.IfExp):
            branch = self.version_condition(node.test)
            if branch is None:
                self.expr(node.test, env)
                body, orelse = self.expr(node.body, env), self.expr(node.orelse, env)
                return body if body == orelse else None
            return self.expr(node.body if branch else node.orelse, env)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = dict(env)
            for gen in node.generators:
                self.bind_target(gen.target, self.element(self.expr(gen.iter, inner)), inner)
                for cond in gen.ifs:
                    self.expr(cond, inner)
            parts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            for part in parts:
                self.expr(part, inner)
            return None
        if isinstance(node, ast.Lambda):
            self.expr(node.body, dict(env))
            return None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, env)
        return None

    @staticmethod
    def element(value: T | None) -> T | None:
        return T("inst", value.name, label=value.name) if value and value.kind == "list" else None

    def version_condition(self, test: ast.expr) -> bool | None:
        """True/False when `test` compares the TensorRT version (see VERSION_FUNCS), else None."""
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
            return None
        left, op, right = test.left, test.ops[0], test.comparators[0]
        if not isinstance(left, ast.Call):
            left, right = right, left
            op = {ast.Lt: ast.Gt(), ast.Gt: ast.Lt(), ast.LtE: ast.GtE(), ast.GtE: ast.LtE()}.get(
                type(op), op
            )
        if not (isinstance(left, ast.Call) and len(left.args) == 1):
            return None
        name = left.func.id if isinstance(left.func, ast.Name) else getattr(left.func, "attr", "")
        arg = left.args[0]
        if name not in VERSION_FUNCS or not (isinstance(arg, ast.Attribute) and arg.attr == "__version__"):
            return None
        base = self.expr(arg.value)
        if base is None or base.kind != "module":
            return None
        try:
            bound = ast.literal_eval(right)
        except ValueError:
            return None
        mine = VERSION_FUNCS[name](self.version)
        compare = _COMPARE.get(type(op))
        if compare is None or type(bound) is not type(mine):
            return None
        return bool(compare(mine, bound))

    # -- statements

    def bind_target(self, target: ast.expr, value: T | None, env: dict[str, T | None]) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self.bind_target(t, None, env)

    def assign(self, target: ast.expr, value_node: ast.expr | None, value: T | None) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            if isinstance(value_node, (ast.Tuple, ast.List)) and len(value_node.elts) == len(target.elts):
                for t, v in zip(target.elts, value_node.elts, strict=True):
                    self.assign(t, v, self.expr(v))
                return
            for t in target.elts:
                self.assign(t, None, self.element(value))
            return
        if isinstance(target, ast.Name):
            self.env[target.id] = value
            return
        if isinstance(target, ast.Attribute):
            base = self.expr(target.value)
            if base is not None and base.kind == "project":
                if value is not None:
                    self.class_attrs.setdefault(base.name, {})[target.attr] = value
                return
            if base is not None and base.kind in ("inst", "class"):
                cls = self.index["classes"].get(base.name, {"members": {}})
                entry = cls["members"].get(target.attr)
                label = f"{base.label}.{target.attr}"
                if entry is None:
                    self.fail(target, label, f"is not an attribute of {base.name}")
                elif entry["kind"] != "property" or not entry["writable"]:
                    self.fail(target, label, f"is read-only on {base.name}")
                else:
                    self.checked.add((target.lineno, f"{label} ="))
            elif base is not None and base.kind == "unknown":
                self.cannot_type(
                    target, f"the type of {ast.unparse(target.value)} ({base.name}) is not followed"
                )
            return
        self.expr(target)

    def block(self, stmts: list[ast.stmt]) -> bool:
        """Walk statements in order; True when the block ends this version's path (return/raise)."""
        return any(self.stmt(stmt) for stmt in stmts)

    def stmt(self, node: ast.stmt) -> bool:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            # `if TYPE_CHECKING: import tensorrt as trt / else: trt = lazy_import(...)`: as for mypy,
            # the typed branch is the module's view of TensorRT
            return self.block(node.body)
        if isinstance(node, ast.If):
            branch = self.version_condition(node.test)
            if branch is not None:
                return self.block(node.body if branch else node.orelse)
            self.expr(node.test)
            return self.block(node.body) & self.block(node.orelse)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            self.imports(node)
        elif isinstance(node, ast.Assign):
            value = self.expr(node.value)
            for target in node.targets:
                self.assign(target, node.value, value)
        elif isinstance(node, ast.AnnAssign):
            value = self.expr(node.value)
            declared = self.annotation(node.annotation)
            self.assign(node.target, node.value, declared or value)
        elif isinstance(node, ast.AugAssign):
            self.expr(node.value)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.function(node, self_type=None)
        elif isinstance(node, ast.ClassDef):
            self.classdef(node)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            self.bind_target(node.target, self.element(self.expr(node.iter)), self.env)
            self.block(node.body)
            self.block(node.orelse)
        elif isinstance(node, ast.While):
            self.expr(node.test)
            self.block(node.body)
            self.block(node.orelse)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                value = self.expr(item.context_expr)
                if item.optional_vars is not None:
                    self.bind_target(item.optional_vars, value, self.env)
            return self.block(node.body)
        elif isinstance(node, ast.Try):
            self.block(node.body)
            for handler in node.handlers:
                self.block(handler.body)
            self.block(node.orelse)
            self.block(node.finalbody)
        elif isinstance(node, (ast.Return, ast.Raise)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child)
            return True
        elif isinstance(node, (ast.Continue, ast.Break)):
            return True
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child)
        return False

    def imports(self, node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tensorrt":
                    self.env[alias.asname or "tensorrt"] = T("module", label="trt")
            return
        if node.module == "tensorrt" and node.level == 0:
            for alias in node.names:
                entry = self.index["module"].get(alias.name)
                if entry is None:
                    self.fail(node, f"trt.{alias.name}", "does not exist")
                    continue
                self.env[alias.asname or alias.name] = self.from_entry(
                    entry, f"trt.{alias.name}", bound=False
                )

    def function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, self_type: T | None) -> None:
        outer = self.env
        self.env = dict(outer)
        for deco in node.decorator_list:
            self.expr(deco)
        args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        for i, arg in enumerate(args):
            self.env[arg.arg] = (
                self_type if i == 0 and self_type is not None else self.annotation(arg.annotation)
            )
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            self.expr(default)
        self.annotation(node.returns)
        self.block(node.body)
        self.env = outer

    def classdef(self, node: ast.ClassDef) -> None:
        bases = [self.expr(b) for b in node.bases]
        trt_bases = [b for b in bases if b is not None and b.kind == "class"]
        attrs = self.class_attrs.setdefault(node.name, {})
        for sub in ast.walk(node):  # `self.x: trt.T` anywhere in the class types self.x everywhere
            target = sub.target if isinstance(sub, ast.AnnAssign) else None
            if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "self":
                declared = self.annotation(sub.annotation)
                if declared is not None:
                    attrs[target.attr] = declared
        self_type = T("project", node.name, label="self")
        methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for base in trt_bases:  # an override TensorRT calls back must exist in its base class
            members = self.index["classes"][base.name]["members"]
            for method in methods:
                if method.name.startswith("_"):
                    continue
                entry = members.get(method.name)
                label = f"{base.label}.{method.name}"
                if entry is None or entry["kind"] != "method":
                    self.fail(method, label, f"overrides nothing: {base.name} has no method {method.name}")
                    continue
                given = len(method.args.posonlyargs) + len(method.args.args)
                counts = {len(s["params"]) for s in entry["sigs"]}
                if counts and given not in counts:
                    self.fail(
                        method,
                        label,
                        f"takes {given} arguments but {base.name}.{method.name} takes {sorted(counts)}",
                    )
                else:
                    self.checked.add((method.lineno, f"{label} (override)"))
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                is_static = any(
                    isinstance(d, ast.Name) and d.id == "staticmethod" for d in stmt.decorator_list
                )
                self.function(stmt, self_type=None if is_static else self_type)
            else:
                self.stmt(stmt)

    def run(self) -> None:
        # two passes: the first types `self.x = value` assignments made in later methods
        self.block(self.tree.body)
        self.failures.clear()
        self.untyped.clear()
        self.env = {}
        self.block(self.tree.body)


# Attribute names of Python's own types and paths: when one of these is used on something the walk
# cannot type, it is not evidence of TensorRT.
_GENERIC_NAMES = {
    n for t in (object, str, bytes, int, float, list, dict, set, tuple, memoryview, Path) for n in dir(t)
}


@dataclasses.dataclass
class TrtResult:
    failures: list[Failure]
    allowed_used: set[tuple[str, str]]  # the UNTYPED_ALLOWED entries that matched
    checked: set[tuple[str, int, str]]  # (file, line, name) of every use checked in some version


def check_trt(files: list[Path], root: Path, indexes: list[dict[str, Any]]) -> TrtResult:
    """The TensorRT uses in `files` checked against each index."""
    result = TrtResult([], set(), set())
    trees = {path: ast.parse(path.read_text(encoding="utf-8"), str(path)) for path in files}
    returns: dict[str, Returns] = {}
    for tree in trees.values():  # top-level functions' return annotations, callable from other files
        aliases = frozenset(
            a.asname or a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for a in node.names
            if a.name == "tensorrt"
        )
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
                returns[node.name] = (node.returns, aliases)
    for index in indexes:
        for path, tree in trees.items():
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
            walker = Walker(rel, tree, index, returns)
            walker.run()
            tag = index["version"]
            result.failures += [
                dataclasses.replace(f, problem=f"{f.problem} [{tag}]") for f in walker.failures
            ]
            result.allowed_used |= walker.untyped
            result.checked |= {(rel, line, name) for line, name in walker.checked}
    return result


# ----------------------------------------------------------------------------------------------
# torch-tensorrt


def torch_trt_range(pyproject: Path, data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The releases in the data that the gpu extra's pin admits, and problems with the pin itself."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    reqs = [r for deps in project.get("optional-dependencies", {}).values() for r in deps]
    reqs += project.get("dependencies", [])
    pins = [r for r in reqs if re.match(r"^torch[-_]tensorrt\b", r)]
    if not pins:
        return [], []
    spec = SpecifierSet(re.sub(r"^torch[-_]tensorrt\s*(\[[^\]]*\])?", "", pins[0]).split(";")[0].strip())
    known = sorted(data["versions"], key=Version)
    oldest, newest = Version(known[0]), Version(known[-1])
    problems = []
    below = (
        Version(f"{oldest.major}.{oldest.minor - 1}.99")
        if oldest.minor
        else Version(f"{oldest.major - 1}.99")
    )
    if spec.contains(below, prereleases=False) or spec.contains("0.1"):
        problems.append(
            f"pyproject.toml admits torch-tensorrt {pins[0]!r}, older than {oldest}, the oldest release "
            f"with compile keywords in {TORCH_TRT_KEYWORDS.name}: raise the lower bound or add the release"
        )
    above = Version(f"{newest.major}.{newest.minor + 1}.0")
    if spec.contains(above):
        problems.append(
            f"pyproject.toml admits torch-tensorrt {above} and later ({pins[0]!r}), whose compile keywords "
            f"are not in {TORCH_TRT_KEYWORDS.name}: add an upper bound (<{above}) or add that release"
        )
    return [v for v in known if spec.contains(v)], problems


def torch_trt_calls(tree: ast.Module) -> Iterator[tuple[ast.Call, str]]:
    """Calls of torch_tensorrt.compile / torch_tensorrt.dynamo.compile, however they were imported."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch_tensorrt":
                    names[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch_tensorrt"
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("torch_tensorrt")
        ):
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.insert(0, f.attr)
                f = f.value
            if isinstance(f, ast.Name) and f.id in names:
                full = ".".join([names[f.id], *parts])
                if full in ("torch_tensorrt.compile", "torch_tensorrt.dynamo.compile"):
                    yield node, full


def check_torch_trt(
    files: list[Path], root: Path, data: dict[str, Any], versions: list[str]
) -> list[Failure]:
    failures = []
    for path in files:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        for node, name in torch_trt_calls(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            ir = next((k.value for k in node.keywords if k.arg == "ir"), None)
            if name == "torch_tensorrt.compile" and not (
                ir is None or (isinstance(ir, ast.Constant) and ir.value in ("dynamo", "default"))
            ):
                failures.append(
                    Failure(rel, node.lineno, name, "the check knows the dynamo path only: pass ir='dynamo'")
                )
                continue
            npos = sum(not isinstance(a, ast.Starred) for a in node.args)
            for version in versions:
                accepted = data["versions"][version]
                dyn = accepted["torch_tensorrt.dynamo.compile"]
                params = [[n, "pos", True] for n in dyn["positional"]]
                params += [[n, "kwonly", True] for n in dyn["keyword_only"] + dyn["kwargs_read"]]
                if name == "torch_tensorrt.compile":
                    top = accepted["torch_tensorrt.compile"]
                    params = [[n, "pos", True] for n in top["positional"]]
                    taken = set(top["positional"]) | {"exported_program", "arg_inputs", "inputs"}
                    params += [
                        [n, "kwonly", True] for n in dyn["positional"] + dyn["keyword_only"] if n not in taken
                    ]
                    params += [
                        [n, "kwonly", True]
                        for n in dyn["kwargs_read"] + accepted["torch_tensorrt.dynamo.trace"]["kwargs_read"]
                    ]
                    params = list({p[0]: p for p in params}.values())
                keywords = [k.arg for k in node.keywords if k.arg is not None]
                problem = bind_failure(
                    params, npos, any(isinstance(a, ast.Starred) for a in node.args), keywords, True
                )
                if problem is not None:
                    failures.append(Failure(rel, node.lineno, name, f"{problem} [torch-tensorrt {version}]"))
    return failures


def torch_trt_keywords_from_wheel(wheel: Path) -> dict[str, Any]:
    """The keyword lists of one torch-tensorrt release, read from its wheel's sources."""

    def function(source: str, name: str) -> ast.FunctionDef:
        return next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)

    def kwargs_read(fn: ast.FunctionDef) -> list[str]:
        found = set()
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
            ):
                owner = node.func.value
                if (
                    isinstance(owner, ast.Name)
                    and owner.id == "kwargs"
                    and isinstance(node.args[0], ast.Constant)
                ):
                    found.add(node.args[0].value)
            elif (
                isinstance(node, ast.Subscript)
                and isinstance(node.value, ast.Name)
                and node.value.id == "kwargs"
            ):
                if isinstance(node.slice, ast.Constant):
                    found.add(node.slice.value)
            elif (
                isinstance(node, ast.Compare)
                and isinstance(node.left, ast.Constant)
                and isinstance(node.ops[0], ast.In)
                and "kwargs" in ast.unparse(node.comparators[0])
            ):
                found.add(node.left.value)
        return sorted(found)

    def params(fn: ast.FunctionDef) -> dict[str, list[str]]:
        return {
            "positional": [a.arg for a in [*fn.args.posonlyargs, *fn.args.args]],
            "keyword_only": [a.arg for a in fn.args.kwonlyargs],
            "kwargs_read": kwargs_read(fn),
        }

    with zipfile.ZipFile(wheel) as zf:
        top = function(zf.read("torch_tensorrt/_compile.py").decode(), "compile")
        dyn = function(zf.read("torch_tensorrt/dynamo/_compiler.py").decode(), "compile")
        trace = function(zf.read("torch_tensorrt/dynamo/_tracer.py").decode(), "trace")
    return {
        "torch_tensorrt.compile": params(top),
        "torch_tensorrt.dynamo.compile": params(dyn),
        "torch_tensorrt.dynamo.trace": {"kwargs_read": kwargs_read(trace)},
    }


def refresh_torch_trt_keywords(versions: list[str]) -> None:
    """Rewrite the keyword data from the wheels of `versions` (about 4 MB each; the maintainer's step)."""
    data: dict[str, Any] = {"source": "", "versions": {}}
    data["source"] = (
        "parameters of compile() in torch_tensorrt/_compile.py and torch_tensorrt/dynamo/_compiler.py, and "
        "the **kwargs names they and dynamo/_tracer.py trace() read, from each release's wheel; written by "
        "python3 ci/trt_conformance.py --refresh-torch-tensorrt VERSION..."
    )
    with tempfile.TemporaryDirectory() as tmp:
        for version in versions:
            wheel = _pip_download(f"torch-tensorrt=={version}", Path(tmp) / version)
            data["versions"][version] = torch_trt_keywords_from_wheel(wheel)
    tmp_path = TORCH_TRT_KEYWORDS.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(data, indent=1) + "\n")
    tmp_path.replace(TORCH_TRT_KEYWORDS)


# ----------------------------------------------------------------------------------------------


def run(root: Path, bindings: Iterable[str], files: list[Path] | None = None) -> tuple[list[str], TrtResult]:
    """Every failure line for the project at `root` (or for `files`), empty when it conforms, and
    the TensorRT result (what was checked)."""
    indexes = [bindings_index(b) for b in bindings]
    trt_files = files if files is not None else discover(root, "tensorrt")
    trt_result = check_trt(trt_files, root, indexes)
    failures = list(trt_result.failures)
    data = json.loads(TORCH_TRT_KEYWORDS.read_text(encoding="utf-8"))
    versions, lines = torch_trt_range(root / "pyproject.toml", data)
    tt_files = files if files is not None else discover(root, "torch_tensorrt")
    if tt_files and not versions and not lines:
        lines.append(
            "pyproject.toml pins no torch-tensorrt release whose keywords are known: pin e.g. >=2.10,<2.15"
        )
    failures += check_torch_trt(tt_files, root, data, versions)
    if files is None:
        for rel, text in sorted(set(UNTYPED_ALLOWED) - trt_result.allowed_used):
            lines.append(f"{rel}: UNTYPED_ALLOWED entry {text!r} matches nothing: remove it")
    merged: dict[tuple[str, int, str, str], list[str]] = {}
    for f in failures:
        problem, _, version = f.problem.rpartition(" [")
        merged.setdefault((f.path, f.line, f.name, problem), []).append(version.rstrip("]"))
    for (path, line, name, problem), versions_failed in sorted(merged.items()):
        lines.append(f"{path}:{line}: {name}: {problem} (in {', '.join(versions_failed)})")
    return lines, trt_result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="check these files instead of discovering them")
    parser.add_argument("--root", type=Path, default=REPO, help="the project to check (default: this one)")
    parser.add_argument(
        "--bindings", action="append", help=f"PACKAGE==VERSION (default: {' '.join(BINDINGS)})"
    )
    parser.add_argument("--list", action="store_true", help="also print every TensorRT use that was checked")
    parser.add_argument("--dump-bindings", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--refresh-torch-tensorrt", nargs="+", metavar="VERSION", help="rewrite the keyword data"
    )
    args = parser.parse_args(argv)
    if args.dump_bindings:
        json.dump(dump_bindings(), sys.stdout)
        return 0
    if args.refresh_torch_tensorrt:
        refresh_torch_trt_keywords(args.refresh_torch_tensorrt)
        return 0
    bindings = args.bindings or list(BINDINGS)
    try:
        lines, trt_result = run(args.root.resolve(), bindings, [f.resolve() for f in args.files] or None)
    except (IndexUnreachable, RuntimeError) as e:
        print(f"trt-conformance: {e}", file=sys.stderr)
        return 2
    if args.list:
        for path, line, name in sorted(trt_result.checked):
            print(f"checked {path}:{line}: {name}")
    for line in lines:
        print(line)
    versions = ", ".join(b.split("==")[1] for b in bindings)
    files = len({c[0] for c in trt_result.checked})
    print(
        f"trt-conformance: {len(trt_result.checked)} TensorRT uses in {files} files checked against TensorRT "
        f"{versions}, torch-tensorrt compile calls against the pinned releases: {len(lines)} failure(s)"
    )
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
