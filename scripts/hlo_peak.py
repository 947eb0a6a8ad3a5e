"""Where a compiled program's memory peak is: the buffers live at the peak of XLA's own heap simulation.

XLA places a program's temporaries by simulating its schedule (ALLOC / FREE / SHARE_WITH events per buffer, loop
bodies included) and dumps that trace with the HLO when asked for protos. Replaying it gives the bytes live after
each event; at the largest, the live buffers are listed with the instruction that defines each (its shape and the
jax op it came from). This is the analysis that found where the LoRA kernels' extra peak sat (docs/BENCHMARKS.md,
"Where the LoRA kernels' peak memory went"), kept as a tool:

    JAXVLM_COMPILATION_CACHE=0 XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_proto --xla_dump_hlo_module_re=.*grad_step.*" \\
        python -m scripts.bench_train --batch 8 --weights bf16 --remat full
    python -m scripts.hlo_peak DIR [--module grad_step] [--top 25] [--json OUT.json] [--against DIR2]
        [--explain INSTRUCTION ...]

With --explain, what the named instructions are (opcode, operands, users, a fusion's computation): how a buffer at
the peak is traced to the code that made it. With --against, a second program's peak too (the same step with a kernel off, or an older tree) and the buffers live
at one peak and not at the other, matched by shape and jax op.

Reads `*after_optimizations.hlo.pb` (an `xla.HloProto`: the optimized module and its buffer assignment) with the
protobuf wire decoder alone: no XLA proto classes are needed. One report per heap-simulation trace (one per
temporary allocation; parameters and outputs are not simulated).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re

from google.protobuf.internal.decoder import _DecodeVarint

# xla_data.proto's PrimitiveType values, the common ones.
DTYPES = {1: "pred", 2: "s8", 3: "s16", 4: "s32", 5: "s64", 6: "u8", 7: "u16", 8: "u32", 9: "u64", 10: "f16",
          11: "f32", 12: "f64", 13: "tuple", 16: "bf16", 17: "token", 19: "f8e5m2", 20: "f8e4m3fn", 21: "s4", 22: "u4"}
ALLOC, FREE, SHARE_WITH = 0, 1, 2


def fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """A protobuf message's (field number, value) pairs in order: ints for varints, bytes for the rest."""
    out, pos = [], 0
    while pos < len(buf):
        tag, pos = _DecodeVarint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _DecodeVarint(buf, pos)
        elif wire == 2:
            size, pos = _DecodeVarint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + width], pos + width
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} for field {number}")
        out.append((number, value))
    return out


def _one(msg, number, default=None):
    return next((v for n, v in msg if n == number), default)


def _all(msg, number):
    return [v for n, v in msg if n == number]


def _ints(msg, number) -> list[int]:
    """A repeated int64 field, packed or not."""
    values = []
    for v in _all(msg, number):
        if isinstance(v, int):
            values.append(v)
        else:
            pos = 0
            while pos < len(v):
                x, pos = _DecodeVarint(v, pos)
                values.append(x)
    return values


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def shape_str(shape: bytes, index: list[int]) -> str:
    """ShapeProto (element_type 2, dimensions 3, tuple_shapes 4) at `index`, as `bf16[8,514,1536]`."""
    msg = fields(shape)
    for i in index:
        tuples = _all(msg, 4)
        if i >= len(tuples):
            return "?"
        msg = fields(tuples[i])
    dtype = DTYPES.get(_one(msg, 2, 0), f"t{_one(msg, 2, 0)}")
    if dtype == "tuple":
        return "(" + ", ".join(shape_str(t, []) for t in _all(msg, 4)) + ")"
    return f"{dtype}[{','.join(str(_signed(d)) for d in _ints(msg, 3))}]"


def read(path: str) -> dict:
    """The instructions (id -> name, shape, op_name), logical buffers and heap-simulation traces of an HloProto
    file."""
    with open(path, "rb") as f:
        proto = fields(f.read())
    module, assignment = _one(proto, 1), _one(proto, 3)
    if module is None or assignment is None:
        raise ValueError(f"{path}: not an HloProto with a buffer assignment (dump with --xla_dump_hlo_as_proto; a "
                         f"program loaded from JAX's compilation cache is dumped without one: run with "
                         f"JAXVLM_COMPILATION_CACHE=0)")
    instructions, computations = {}, {}
    for computation in _all(fields(module), 3):
        computation = fields(computation)
        cname, ids = _one(computation, 1, b"").decode(), []
        for ins in _all(computation, 2):
            ins = fields(ins)
            metadata = fields(_one(ins, 7, b""))
            ids.append(_one(ins, 35, 0))
            instructions[ids[-1]] = dict(name=_one(ins, 1, b"").decode(), shape=_one(ins, 3, b""),
                                         op_name=_one(metadata, 2, b"").decode(), opcode=_one(ins, 2, b"").decode(),
                                         operands=_ints(ins, 36), calls=_ints(ins, 38), computation=cname,
                                         target=_one(ins, 28, b"").decode())
        computations[_one(computation, 5, 0)] = dict(name=cname, instructions=ids)
    assignment = fields(assignment)
    buffers = {}
    for buffer in _all(assignment, 1):
        buffer = fields(buffer)
        where = fields(_one(buffer, 3, b""))
        buffers[_one(buffer, 1, 0)] = dict(size=_one(buffer, 2, 0), instruction=_one(where, 4, 0),
                                           name=_one(where, 2, b"").decode(), index=_ints(where, 3))
    traces = []
    for trace in _all(assignment, 4):
        trace = fields(trace)
        events = []
        for event in _all(trace, 1):
            event = fields(event)
            events.append((_one(event, 1, ALLOC), _one(event, 2, 0), _one(event, 4, b"").decode(),
                           _one(event, 5, 0)))
        traces.append(dict(allocation=_one(trace, 3, 0), events=events))
    return dict(instructions=instructions, computations=computations, buffers=buffers, traces=traces)


def describe(program: dict, buffer_id: int) -> dict:
    buffer = program["buffers"][buffer_id]
    ins = program["instructions"].get(buffer["instruction"], {})
    shape = shape_str(ins["shape"], buffer["index"]) if ins.get("shape") else "?"
    return dict(bytes=buffer["size"], instruction=ins.get("name", buffer["name"]), shape=shape,
                op_name=ins.get("op_name", ""))


def peak(program: dict, trace: dict, top: int = 25) -> dict:
    """Replay one heap-simulation trace: the most bytes live after any event, the instruction being processed
    there, and the `top` largest buffers live then (a buffer shared with another counts once)."""
    sizes = {i: b["size"] for i, b in program["buffers"].items()}
    live, owner, members, now = {}, {}, {}, 0  # live: canonical buffer -> bytes; members: canonical -> its sharers
    best, at, best_live = 0, "", {}
    for kind, buffer, instruction, canonical in trace["events"]:
        if kind == ALLOC:
            live[buffer], owner[buffer], members[buffer] = sizes[buffer], buffer, {buffer}
            now += sizes[buffer]
        elif kind == SHARE_WITH:  # the canonical buffer's memory, held until the last sharer is freed
            root = owner.get(canonical, canonical)
            owner[buffer] = root
            members.setdefault(root, set()).add(buffer)
        elif kind == FREE and buffer in owner:
            root = owner.pop(buffer)
            members[root].discard(buffer)
            if not members[root]:
                del members[root]
                now -= live.pop(root, 0)
        if now > best:
            best, at, best_live = now, instruction, dict(live)
    live_at_peak = [describe(program, b) for b in sorted(best_live, key=lambda b: -best_live[b])]
    return dict(allocation=trace["allocation"], peak_bytes=best, at=at, live_buffers=len(best_live),
                top=live_at_peak[:top], live=live_at_peak)


def explain(program: dict, name: str) -> dict:
    """What instruction `name` is: its opcode (and custom-call target), shape, jax op, operands, users, and for a
    fusion the instructions of the fused computation, so that a buffer at the peak can be traced to the code that
    made it (which product, which scatter) without the HLO text."""
    ins = program["instructions"]
    found = [i for i, d in ins.items() if d["name"] == name]
    if not found:
        raise KeyError(f"no instruction named {name!r} in the program")

    def line(i):
        d = ins[i]
        target = f" {d['target']}" if d["target"] else ""
        return (f"{d['name']} = {d['opcode']}{target} {shape_str(d['shape'], [])} "
                f"({', '.join(ins[o]['name'] for o in d['operands'] if o in ins)})  {d['op_name'][-80:]}")
    me = ins[found[0]]
    users = [i for i, d in ins.items() if found[0] in d["operands"]]
    fused = [line(i) for c in me["calls"] for i in program["computations"].get(c, {}).get("instructions", [])]
    return dict(line=line(found[0]), computation=me["computation"], operands=[line(o) for o in me["operands"]
                                                                              if o in ins],
                users=[line(u) for u in users], fused=fused)


def difference(a: list[dict], b: list[dict]) -> tuple[list[dict], list[dict]]:
    """The buffers live at one peak and not at the other, matched by (shape, jax op): (only in a, only in b)."""
    def key(buffer):
        return buffer["shape"], buffer["op_name"]

    unmatched = {}
    for buffer in b:
        unmatched.setdefault(key(buffer), []).append(buffer)
    only_a = []
    for buffer in a:
        if unmatched.get(key(buffer)):
            unmatched[key(buffer)].pop()
        else:
            only_a.append(buffer)
    return only_a, [buffer for rest in unmatched.values() for buffer in rest]


def find(path: str, module: str) -> str:
    if os.path.isfile(path):
        return path
    hits = sorted(p for p in glob.glob(os.path.join(path, "*after_optimizations.hlo.pb")) if re.search(module, p))
    if not hits:
        raise FileNotFoundError(f"{path}: no *after_optimizations.hlo.pb matching {module!r} "
                                "(was the program compiled with --xla_dump_hlo_as_proto?)")
    return max(hits, key=os.path.getsize)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="an *after_optimizations.hlo.pb file, or the --xla_dump_to directory")
    ap.add_argument("--module", default="", help="regex on the file name (the largest match is read)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--against", help="a second dump (same forms as path): the buffers live at one program's "
                    "peak and not at the other's")
    ap.add_argument("--json", help="also write the reports here")
    ap.add_argument("--explain", nargs="+", default=[], metavar="NAME",
                    help="also print what these instructions are (a buffer's `instruction` column): opcode, "
                    "operands, users, fused computation")
    args = ap.parse_args(argv)
    path = find(args.path, args.module)
    program = read(path)
    reports = sorted((peak(program, t, args.top) for t in program["traces"]), key=lambda r: -r["peak_bytes"])
    for r in reports:
        print(f"{os.path.basename(path)}: trace of allocation {r['allocation']}: peak {r['peak_bytes']:,} bytes at "
              f"{r['at']}, {r['live_buffers']} buffers live")
        show(r["top"])
    out = dict(file=os.path.basename(path), reports=[{k: v for k, v in r.items() if k != "live"} for r in reports])
    if args.against:
        other_path = find(args.against, args.module)
        other = read(other_path)
        theirs = max((peak(other, t, args.top) for t in other["traces"]), key=lambda r: r["peak_bytes"])
        only_a, only_b = difference(reports[0]["live"], theirs["live"])
        out["against"] = dict(file=os.path.basename(other_path), peak_bytes=theirs["peak_bytes"], at=theirs["at"],
                              only_here=only_a[:args.top], only_there=only_b[:args.top],
                              only_here_bytes=sum(b["bytes"] for b in only_a),
                              only_there_bytes=sum(b["bytes"] for b in only_b))
        print(f"against {other_path}: peak {theirs['peak_bytes']:,} bytes at {theirs['at']} "
              f"({reports[0]['peak_bytes'] - theirs['peak_bytes']:+,} here)")
        for name, side in (("only here", only_a), ("only there", only_b)):
            print(f" live at the peak {name}: {sum(b['bytes'] for b in side):,} bytes in {len(side)} buffers")
            show(side[:args.top])
    out["explained"] = {name: explain(program, name) for name in args.explain}
    for name, e in out["explained"].items():
        print(f"{e['line']}\n  in {e['computation']}")
        for title in ("operands", "users", "fused"):
            print("".join(f"  {title[:-1] if title != 'fused' else 'fused'}: {x}\n" for x in e[title]), end="")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return out


def show(buffers: list[dict]):
    for b in buffers:
        print(f"  {b['bytes']:>14,}  {b['shape']:<28} {b['instruction']:<40} {b['op_name'][-80:]}")


if __name__ == "__main__":
    main()
