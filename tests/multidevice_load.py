"""Run in a subprocess with 8 forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): loads a tiny
model straight onto each mesh asked for (`from_pretrained(mesh=...)`), 16-bit and NF4, and compares it with the model
loaded on one device and then placed by `shard_model`. Prints one JSON line per (mesh, quantization): the leaves that
differ in bits or sharding, the logits' differences, and the bytes the loader read from the checkpoint (all of this
process's reads, and device 0's blocks). tests/test_load_sharding.py starts it; the main pytest process has one
device."""
import json
import sys


def bits(x):
    import numpy as np
    return np.asarray(x).tobytes()


def count_reads():
    """Wraps the checkpoint's slice reader and the sharded reader so that they count bytes; returns the counts."""
    import jax
    from jaxvlm.converters import hf_import
    from jaxvlm.converters.safetensors_io import Checkpoint
    counts = {"process": 0, "device0": 0}
    log = []  # (key, index, bytes) of every slice read
    read_slice, read_sharded = Checkpoint.read_slice, hf_import.read_sharded

    def counting_read_slice(self, key, index):
        block = read_slice(self, key, index)
        log.append((key, tuple(index), block.nbytes))
        counts["process"] += block.nbytes
        return block

    def counting_read_sharded(ckpt, disk_keys, per_layer, shape, sharding):
        start = len(log)
        out = read_sharded(ckpt, disk_keys, per_layer, shape, sharding)
        index = sharding.addressable_devices_indices_map(shape)[jax.devices()[0]]
        keys = [disk_keys[r] for r in range(*index[0].indices(shape[0]))] if per_layer else disk_keys
        block = index[1:] if per_layer else index
        counts["device0"] += sum(n for key, i, n in log[start:] if key in keys and i == tuple(block))
        return out

    Checkpoint.read_slice = counting_read_slice
    hf_import.read_sharded = counting_read_sharded
    return counts


def main(model_dir, meshes, forward_mesh):
    import jax
    import numpy as np
    from flax import nnx
    from jaxvlm import FastVisionModel
    from jaxvlm.converters.safetensors_io import Checkpoint
    from jaxvlm.sharding import make_mesh, model_shardings, shard_model
    from tests.conftest import chat, random_image
    from tests.test_qwen2_vl_parity import encode

    counts = count_reads()
    checkpoint_bytes = sum(e.end - e.start for e in Checkpoint(model_dir).entries.values())
    for load_in_4bit in (False, True):
        one, processor = FastVisionModel.from_pretrained(model_dir, load_in_4bit=load_in_4bit, dtype="float32")
        if load_in_4bit:
            batch = encode(processor, [chat("describe the image", 1)], [random_image(56, 84)])
            one_logits = np.asarray(one(**batch))
        for spec in meshes:
            mesh = make_mesh(spec)
            counts.update(process=0, device0=0)
            model, _ = FastVisionModel.from_pretrained(model_dir, load_in_4bit=load_in_4bit, dtype="float32",
                                                       mesh=spec)
            read = dict(counts)
            # shard_model(one, mesh) is `one`'s arrays put where model_shardings says: compare with those directly.
            ours, theirs = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(one))
            placement = nnx.to_flat_state(model_shardings(one, mesh))
            names = [".".join(map(str, p)) for p, _ in ours]
            assert names == [".".join(map(str, p)) for p, _ in theirs] == [".".join(map(str, p)) for p, _ in placement]
            value_diff, sharding_diff = [], []
            for name, (_, a), (_, b), (_, s) in zip(names, ours, theirs, placement):
                a, b, s = (jax.tree.leaves(v.get_value()) for v in (a, b, s))
                if len(a) != len(b) or any(bits(x) != bits(y) or x.dtype != y.dtype for x, y in zip(a, b)):
                    value_diff.append(name)
                if len(a) != len(s) or any(x.sharding != y for x, y in zip(a, s)):
                    sharding_diff.append(name)
            # The trainer calls shard_model on a model that may already be on its mesh: nothing should move.
            again = jax.tree.leaves(nnx.state(shard_model(model, make_mesh(spec))))
            moved = sum(s.data.unsafe_buffer_pointer() != t.data.unsafe_buffer_pointer()
                        for x, y in zip(jax.tree.leaves(nnx.state(model)), again)
                        for s, t in zip(x.addressable_shards, y.addressable_shards))
            result = {"mesh": spec, "load_in_4bit": load_in_4bit, "devices": int(mesh.size), "leaves": len(names),
                      "value_diff": value_diff, "sharding_diff": sharding_diff, "moved_by_shard_model": moved,
                      "checkpoint_bytes": checkpoint_bytes, "read_by_process": read["process"],
                      "read_for_device0": read["device0"]}
            if load_in_4bit and spec == forward_mesh:
                logits = np.asarray(model(**batch))
                result["logits_error"] = float(np.abs(logits - one_logits).max() / np.abs(one_logits).max())
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:], forward_mesh=sys.argv[2]))
