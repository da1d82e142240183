"""Find address offsets a Triton kernel multiplies in 32 bits, from its TTIR text.

A tensor with more than 2**31 elements needs 64-bit offsets wherever an offset grows with the
tensor: a row (token) index times a row stride, a batch or head index times its stride, a
program id times a tensor size. :func:`int32_offset_products` reads the TTIR of a compiled
kernel (``compiled.asm["ttir"]``) and returns every 32-bit ``arith.muli`` whose product flows
into the offset of a ``tt.addptr`` (directly, or after a cast to 64 bits, which comes too
late) and that multiplies two quantities of which neither is a compile-time bound.

Each SSA value gets a class that says how large it can be:

``C``  a constant;
``R``  built from constants and ``tt.make_range`` only (bounded by the tile sizes);
``P``  a block counter: a program id or a loop induction variable, or one divided / taken
       modulo by something (``pid // n``, ``pid % n``), or plus a constant;
``A``  a run-time scalar: a kernel argument (a size or a stride) or a loaded value;
``S``  a step: a constant times a run-time scalar (``BLOCK_K * stride_k``: the stride of
       one tile, as large as one tile's span of the tensor);
``I``  an index into one dimension (``pid * BLOCK_M + arange``, ``rows + 1``);
``X``  a product that grows with the tensor: anything else multiplied (``rows * stride``,
       ``pid * stride``, ``b * H``, ``rows * 4096``).

A 32-bit product of class ``X`` that reaches an address offset is a finding. Products in 64
bits (after ``arith.extsi``) are what the kernels should compute, and are never findings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = r"%[\w.$\-]+(?:#\d+)?"
_DEF = re.compile(r"^\s*(%[\w.$\-]+(?::\d+)?(?:\s*,\s*%[\w.$\-]+)*)\s*=\s*\"?([\w.]+)\"?(.*)$")
_FOR = re.compile(r"scf\.for\s+(%[\w.$\-]+)\s*=\s*(" + _NAME + r")\s+to\s+(" + _NAME + r")\s+step\s+("
                  + _NAME + r")(?:\s+iter_args\((.*?)\))?")
_LOC_REF = re.compile(r"\bloc\((#loc\d*)\)\s*$")
_LOC_DEF = re.compile(r"^(#loc\d*)\s*=\s*loc\((.*)\)\s*$")
_NARROW_INT = re.compile(r"(?:^|x)i(?:1|8|16|32)>?$")

_MEMORY_READS = {"tt.load", "tt.atomic_rmw", "tt.atomic_cas"}
#: a grid coordinate times a constant up to this is a tile start (``pid * BLOCK_M``)
SMALL_CONSTANT = 256


@dataclass(frozen=True)
class OffsetFinding:
    """One 32-bit product that reaches an address: the kernel, its TTIR line, its source line."""
    kernel: str
    ttir: str
    source: str

    def __str__(self) -> str:
        return f"{self.kernel}: {self.ttir.strip()}  ({self.source})"


@dataclass
class _Op:
    name: str
    operands: list
    narrow: bool  # element type of the result is a 32-bit (or narrower) integer
    scalar: bool  # not a tensor
    text: str
    loc: str


def _operands(rest: str) -> list:
    body = rest.split(" loc(", 1)[0]
    return re.findall(_NAME, body)


def _result_type(rest: str) -> str:
    body = rest.split(" loc(", 1)[0]
    return body.rsplit(":", 1)[-1].strip() if ":" in body else ""


class _Kernel:
    """The def-use graph of one TTIR function (scf.for / scf.if results wired to their yields)."""

    def __init__(self, ttir: str):
        self.ops: dict[str, _Op] = {}
        self.extra: dict[str, list] = {}  # block arguments / region results -> their sources
        self.block_counters: set[str] = set()
        self.addptr_offsets: list[tuple[str, str, str]] = []  # (offset name, line, loc)
        self.locs: dict[str, str] = {}
        self.name = "kernel"
        self._classes: dict[str, str] = {}
        self.tile_sizes: set[int] = set()  # lengths of the kernel's tl.arange ranges
        self.constants: dict[str, int] = {}  # integer constant -> its (splat) value
        self.args: dict[str, bool] = {}  # integer kernel argument -> is a stride
        stack: list[dict] = []
        for line in ttir.splitlines():
            m = _LOC_DEF.match(line.strip())
            if m:
                self.locs[m.group(1)] = m.group(2)
                continue
            stripped = line.strip()
            fn = re.search(r"tt\.func\s+(?:public\s+|private\s+)?@([\w$.]+)", stripped)
            if fn:
                self.name = fn.group(1)
                for arg, ty in re.findall(r"(%[\w.$\-]+):\s*(i\d+)", stripped):
                    self.args[arg] = arg.startswith("%stride")
            closes = stripped.startswith("}")
            opens = stripped.endswith("{")
            if closes and not opens and stack:
                stack.pop()
            if closes:
                continue
            if stripped.startswith("scf.yield"):
                if stack:
                    stack[-1]["yields"].append(_operands(stripped[len("scf.yield"):]))
                    self._wire(stack[-1])
                continue
            ref = _LOC_REF.search(stripped)
            loc = ref.group(1) if ref else ""
            region = {"results": [], "iter": [], "inits": [], "yields": []}
            m = _DEF.match(stripped)
            results: list[str] = []
            if m:
                results = _expand_results(m.group(1))
                opname, rest = m.group(2), m.group(3)
            else:
                head = stripped.split(None, 1)
                opname = head[0].strip('"') if head else ""
                rest = head[1] if len(head) > 1 else ""
            if opname == "scf.for":
                f = _FOR.search(stripped)
                if f:
                    self.block_counters.add(f.group(1))
                    self.extra[f.group(1)] = [f.group(2), f.group(3)]
                    pairs = re.findall(r"(%[\w.$\-]+)\s*=\s*(" + _NAME + ")", f.group(5) or "")
                    region.update(results=results, iter=[p[0] for p in pairs],
                                  inits=[p[1] for p in pairs])
                    for it, init in pairs:
                        self.extra.setdefault(it, []).append(init)
                    for r, (_, init) in zip(results, pairs):
                        self.extra.setdefault(r, []).append(init)
            elif opname in ("scf.if", "scf.while"):
                region.update(results=results)
            elif opname == "tt.addptr":
                ops = _operands(rest)
                if len(ops) >= 2:
                    self.addptr_offsets.append((ops[1], stripped, loc))
            if opname == "tt.make_range":
                self.tile_sizes.update(int(v) for v in re.findall(r"tensor<(\d+)x", stripped))
            if opname == "arith.constant" and results:
                c = re.search(r"arith\.constant\s+(?:dense<)?(-?\d+)\b", stripped)
                if c:
                    self.constants[results[0]] = int(c.group(1))
            if m and opname not in ("scf.for", "scf.if", "scf.while"):
                rtype = _result_type(rest)
                narrow = bool(_NARROW_INT.search(rtype))
                for r in results:
                    self.ops[r] = _Op(opname, _operands(rest), narrow, "tensor<" not in rtype,
                                      stripped, loc)
            if opens:
                stack.append(region)

    def _wire(self, region: dict) -> None:
        values = region["yields"][-1]
        for targets in (region["results"], region["iter"]):
            for t, v in zip(targets, values):
                self.extra.setdefault(t, []).append(v)

    # -- classes -------------------------------------------------------------------------

    def klass(self, name: str, _seen=None) -> str:
        if name in self._classes:
            return self._classes[name]
        seen = _seen if _seen is not None else set()
        if name in seen:
            return "C"  # a loop-carried value's own back edge adds nothing
        seen.add(name)
        k = self._klass(name, seen)
        self._classes[name] = k
        return k

    def _klass(self, name: str, seen) -> str:
        if name in self.block_counters:  # an induction variable: as large as its bounds
            return _join(["P"] + [self.klass(s, seen) for s in self.extra[name]], scalar=True)
        op = self.ops.get(name)
        if op is None:
            sources = self.extra.get(name)
            if sources:
                return _join([self.klass(s, seen) for s in sources], scalar=True)
            if name in self.args:
                return "W" if self.args[name] else "P"
            return "I"  # an argument of a combine region
        if op.name == "arith.constant":
            return "C" if _small_constant(op.text) else "K"
        if op.name == "tt.make_range":
            return "R"
        if op.name == "tt.get_program_id" or op.name == "tt.get_num_programs":
            return "P"
        if op.name in _MEMORY_READS:
            return "P" if op.scalar else "I"
        if op.name == "arith.cmpi":
            return "B"
        if op.name in ("arith.remsi", "arith.remui"):  # below both operands: the smaller class
            ks = [self.klass(o, seen) for o in op.operands]
            k = min(ks, key=_ORDER.index)
            return "R" if k in "CK" and not op.scalar else k
        ks = [self.klass(o, seen) for o in _magnitude_operands(op)]
        if not ks:
            return "I"
        if op.name in ("arith.muli", "arith.shli"):
            return _product(ks, [self.constants.get(o) for o in op.operands], self.tile_sizes)
        if op.name in ("arith.extui", "arith.extsi") and ks == ["B"]:
            return "B"
        return _join(ks, scalar=op.scalar)

    def _magnitude_operands(self, op: "_Op") -> list:
        if op.name in ("arith.remsi", "arith.remui"):
            return [min(op.operands, key=lambda o: _ORDER.index(self.klass(o)))]
        return _magnitude_operands(op)

    def magnitude_ancestors(self, name: str) -> set[str]:
        """The values whose size can carry into ``name`` (not divisors, comparisons, loads' addresses)."""
        out, todo = set(), [name]
        while todo:
            n = todo.pop()
            if n in out:
                continue
            out.add(n)
            op = self.ops.get(n)
            todo.extend(self._magnitude_operands(op) if op else self.extra.get(n, []))
        return out

    def source_of(self, loc: str) -> str:
        """``file:line`` of a ``#locN`` reference (the innermost call site's callee)."""
        for _ in range(64):
            text = self.locs.get(loc)
            if text is None:
                return loc or "?"
            m = re.match(r'"([^"]+)":(\d+)', text)
            if m:
                return f"{m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}"
            m = re.match(r"callsite\((#loc\d*) at", text) or re.match(r'"[^"]*"\((#loc\d*)\)', text)
            if not m:
                return text
            loc = m.group(1)
        return loc


def _expand_results(spec: str) -> list[str]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if ":" in part:
            base, n = part.split(":")
            out.extend(f"{base}#{i}" for i in range(int(n)))
            out.append(base)
        else:
            out.append(part)
    return out


#: the classes from the smallest to the most dangerous
_ORDER = "CKBRPWSIX"


def _small_constant(text: str) -> bool:
    m = re.search(r"arith\.constant\s+(?:dense<)?(-?\d+)", text)
    return m is not None and abs(int(m.group(1))) <= SMALL_CONSTANT


def _magnitude_operands(op: "_Op") -> list:
    """The operands whose size the result can take on."""
    if op.name in _MEMORY_READS or op.name == "arith.cmpi":
        return []
    if op.name in ("arith.divsi", "arith.divui", "arith.ceildivsi", "arith.floordivsi",
                   "arith.shrsi", "arith.shrui"):
        return op.operands[:1]
    if op.name in ("arith.remsi", "arith.remui"):
        return op.operands[1:2]
    if op.name == "arith.select":
        return op.operands[1:]
    return op.operands


def _join(ks: list[str], scalar: bool) -> str:
    """The class of a sum, a minimum, a broadcast... of values of classes ``ks``."""
    if "X" in ks:
        return "X"
    kinds = set(ks)
    if kinds <= set("CKB"):
        return "K" if "K" in kinds else ("B" if kinds == {"B"} else "C")
    if kinds <= set("CKBR"):
        return "R"
    if kinds <= set("CKBP"):
        return "P"
    if kinds <= set("CKBW"):
        return "W"
    if kinds <= set("CKBWS"):
        return "S"
    return "P" if scalar and kinds <= set("CKBPR") else "I"


def _product(ks: list[str], values: list, tile_sizes: set) -> str:
    """The class of a product of two values of classes ``ks`` (``values``: the constants')."""
    a, b = ks[0], ks[-1]
    if "X" in (a, b):
        return "X"
    if a == "B" or b == "B":
        return b if a == "B" else a
    pair = {a, b}
    if pair <= set("CK"):
        return "K"
    if pair <= set("CKR"):
        return "R"
    if pair == {"P"}:  # grid coordinates and sizes: a tile or chunk start (chunk * rows)
        return "P"
    if pair <= {"P", "I", "C", "K"} and pair & {"C", "K"}:
        # a grid coordinate (or a vector of tile numbers) times a tile size is a tile start
        c = values[0] if values[0] is not None else values[-1]
        tile = c is not None and (abs(c) <= SMALL_CONSTANT or c in tile_sizes)
        return ("P" if "P" in pair else "I") if tile else "X"
    if pair in ({"W", "C"}, {"W", "K"}, {"S", "C"}, {"S", "K"}):
        return "S" if "S" in pair else "W"
    return "X"


def int32_offset_products(ttir: str) -> list[OffsetFinding]:
    """Every 32-bit product in ``ttir`` that grows with a tensor and reaches an address offset."""
    k = _Kernel(ttir)
    found: dict[str, OffsetFinding] = {}
    for offset, _line, _loc in k.addptr_offsets:
        for n in k.magnitude_ancestors(offset):
            op = k.ops.get(n)
            if op is None or op.name != "arith.muli" or not op.narrow or n in found:
                continue
            if k.klass(n) == "X":
                found[n] = OffsetFinding(k.name, op.text, k.source_of(op.loc))
    return list(found.values())
