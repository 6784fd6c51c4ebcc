"""Checkpoint access against checkpoints that Transformers itself wrote: weight maps, sliced reads,
byte counts, which shards get opened, hub ids served from a pre-populated HF cache, and bad input."""

import json
import shutil

import pytest
import torch
from huggingface_hub import HfApi
from transformers import LlamaConfig, LlamaForCausalLM

from checkpoints import COMMIT, populate_hub_cache
from distllama.checkpoint import CheckpointError, _HubRepo, hub_files_for_rank, is_local_checkpoint, \
    resolve_checkpoint

INDEX = "model.safetensors.index.json"
LAYER3 = "model.layers.3."


def tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).to(dtype)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A checkpoint Transformers splits into many shards plus an index; returns (folder, state_dict)."""
    model = tiny_llama()
    folder = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(folder, max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 4, "the test needs a checkpoint with several shards"
    return folder, model.state_dict()


@pytest.fixture(scope="module")
def single_bf16(tmp_path_factory):
    """A one-file bfloat16 checkpoint without index; returns (folder, state_dict)."""
    model = tiny_llama(torch.bfloat16)
    folder = tmp_path_factory.mktemp("single")
    model.save_pretrained(folder)
    assert not (folder / INDEX).exists()
    return folder, model.state_dict()


def index_of(folder) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "ckpt")


# --- local folders -----------------------------------------------------------------------------------


def test_weight_map_and_names_match_what_transformers_wrote(sharded):
    folder, state = sharded
    ckpt = resolve_checkpoint(str(folder))
    assert is_local_checkpoint(str(folder)) and ckpt.hub_id is None
    assert ckpt.root == folder.resolve()
    assert ckpt.weight_map() == index_of(folder)
    assert sorted(ckpt.tensor_names()) == sorted(state)
    assert ckpt.files_opened == set()  # resolving reads the index only
    assert ckpt.total_bytes() == sum(t.numel() * t.element_size() for t in state.values())


def test_reads_equal_transformers_weights_and_count_bytes(sharded):
    folder, state = sharded
    ckpt = resolve_checkpoint(str(folder))
    expected_bytes = 0
    for name in ["model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"]:
        whole = ckpt.read(name)
        assert torch.equal(whole, state[name]) and whole.dtype == torch.float32
        assert ckpt.shape(name) == tuple(state[name].shape) and ckpt.dtype(name) == "F32"
        expected_bytes += state[name].numel() * 4

    q = "model.layers.2.self_attn.q_proj.weight"  # (32, 32)
    rows, cols = ckpt.read(q, dim=0, start=8, stop=16), ckpt.read(q, dim=1, start=4, stop=20)
    assert torch.equal(rows, state[q][8:16]) and torch.equal(cols, state[q][:, 4:20])
    norm = "model.layers.2.input_layernorm.weight"
    assert torch.equal(ckpt.read(norm, dim=0, start=16), state[norm][16:])
    expected_bytes += (8 * 32 + 32 * 16 + 16) * 4
    assert ckpt.bytes_read == expected_bytes


def test_opens_only_the_shards_of_the_tensors_read(sharded):
    folder, state = sharded
    ckpt = resolve_checkpoint(str(folder))
    names = [n for n in state if n.startswith("model.layers.1.")]
    for name in names:
        ckpt.read(name, dim=0, start=0, stop=1)
    expected_files = {index_of(folder)[n] for n in names}
    assert ckpt.files_opened == expected_files == set(ckpt.files_for(names))
    assert len(expected_files) < len(set(index_of(folder).values()))
    ckpt.close()
    assert torch.equal(ckpt.read(names[0]), state[names[0]])  # reopens after close


def test_files_for_layer3_lists_exactly_its_shards(sharded):
    folder, state = sharded
    ckpt = resolve_checkpoint(str(folder))
    names = [n for n in state if n.startswith(LAYER3)]
    index = index_of(folder)
    expected = sorted({index[n] for n in names})
    assert len(expected) > 1, "layer 3 should span several shards in this fixture"
    assert ckpt.files_for(names) == expected
    assert hub_files_for_rank(json.loads((folder / INDEX).read_text()), names) == expected
    assert hub_files_for_rank(ckpt, names) == expected
    assert ckpt.files_opened == set()


def test_single_file_bf16_checkpoint(single_bf16):
    folder, state = single_bf16
    ckpt = resolve_checkpoint(str(folder))
    assert ckpt.weight_map() == dict.fromkeys(state, "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"  # (32, 64)
    assert ckpt.dtype(name) == "BF16"
    cols = ckpt.read(name, dim=1, start=32, stop=64)
    assert cols.dtype == torch.bfloat16 and torch.equal(cols, state[name][:, 32:])
    assert ckpt.bytes_read == 32 * 32 * 2
    assert ckpt.total_bytes() == sum(t.numel() * t.element_size() for t in state.values())


def test_bad_reads(sharded):
    folder, _ = sharded
    ckpt = resolve_checkpoint(str(folder))
    with pytest.raises(CheckpointError, match="model.layers.9.mlp.up_proj.weight"):
        ckpt.read("model.layers.9.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match="no.such.tensor"):
        ckpt.files_for(["model.norm.weight", "no.such.tensor"])
    q = "model.layers.0.self_attn.q_proj.weight"
    for dim, start, stop in [(0, 0, 33), (1, 5, 5), (0, -1, 4), (2, 0, 1)]:
        with pytest.raises(CheckpointError, match="q_proj"):
            ckpt.read(q, dim=dim, start=start, stop=stop)
    with pytest.raises(CheckpointError, match="dim 1"):
        ckpt.read("model.norm.weight", dim=1, start=0, stop=1)
    assert ckpt.bytes_read == 0


def test_missing_shard_names_file_and_tensor(sharded, tmp_path):
    folder, _ = sharded
    copy = copy_of(folder, tmp_path)
    shard = index_of(folder)["model.layers.3.mlp.down_proj.weight"]
    (copy / shard).unlink()
    ckpt = resolve_checkpoint(str(copy))
    with pytest.raises(CheckpointError, match=rf"missing shard file {shard} \(needed for model\.layers\.3\."):
        ckpt.ensure_files(ckpt.files_for(["model.layers.3.mlp.down_proj.weight"]))
    with pytest.raises(CheckpointError, match=rf"missing shard file {shard} \(needed for model\.layers\.3\.mlp"):
        ckpt.read("model.layers.3.mlp.down_proj.weight")
    ckpt.ensure_files(ckpt.files_for(["model.embed_tokens.weight"]))  # other shards are fine


@pytest.mark.parametrize("bad_name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_names_escaping_the_folder_are_rejected(sharded, tmp_path, bad_name):
    folder, _ = sharded
    copy = copy_of(folder, tmp_path)
    index = json.loads((copy / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = bad_name
    (copy / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=bad_name.replace(".", r"\.")):
        resolve_checkpoint(str(copy))


def test_symlinked_shard_escaping_the_folder_is_rejected(sharded, tmp_path):
    folder, state = sharded
    copy = copy_of(folder, tmp_path)
    shard = index_of(folder)["model.norm.weight"]
    outside = tmp_path / "outside.safetensors"
    shutil.move(copy / shard, outside)
    (copy / shard).symlink_to(outside)
    ckpt = resolve_checkpoint(str(copy))
    with pytest.raises(CheckpointError, match=f"{shard} resolves outside"):
        ckpt.read("model.norm.weight")
    with pytest.raises(CheckpointError, match=f"{shard} resolves outside"):
        ckpt.ensure_files([shard])
    assert torch.equal(ckpt.read("model.embed_tokens.weight"), state["model.embed_tokens.weight"])


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}', '{"weight_map": []}', "[1, 2]"])
def test_malformed_index_names_the_file(sharded, tmp_path, content):
    folder, _ = sharded
    copy = copy_of(folder, tmp_path)
    (copy / INDEX).write_text(content)
    with pytest.raises(CheckpointError, match=INDEX.replace(".", r"\.")):
        resolve_checkpoint(str(copy))


def damage(path, how: str) -> None:
    """Corrupt a safetensors file the ways files really break (or are crafted to)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")

    def with_header(h):
        text = json.dumps(h).encode()
        return len(text).to_bytes(8, "little") + text + data[8 + length:]

    if how == "truncated":
        path.write_bytes(data[:-100])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "huge_header":
        path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    elif how == "bad_json":
        path.write_bytes(data[:8] + b"{" * length + data[8 + length:])
    elif how == "unknown_dtype":
        header[name]["dtype"] = "X99"
        path.write_bytes(with_header(header))
    elif how == "dtype_size_mismatch":
        header[name]["dtype"] = "F64"
        path.write_bytes(with_header(header))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "empty", "huge_header", "bad_json", "unknown_dtype",
                                 "dtype_size_mismatch"])
@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_damaged_shard_is_named(sharded, single_bf16, tmp_path, how, layout):
    folder, _ = sharded if layout == "sharded" else single_bf16
    copy = copy_of(folder, tmp_path)
    name = "model.layers.3.mlp.down_proj.weight"
    shard = index_of(folder)[name] if layout == "sharded" else "model.safetensors"
    damage(copy / shard, how)
    with pytest.raises(CheckpointError, match=rf"shard file {shard} .*cannot be read") as error:
        ckpt = resolve_checkpoint(str(copy))
        ckpt.read(name)
    assert "\n" not in str(error.value)
    if layout == "sharded" and how in ("empty", "huge_header", "bad_json"):  # the total from headers, too
        index = json.loads((copy / INDEX).read_text())
        index.pop("metadata", None)
        (copy / INDEX).write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=rf"shard file {shard} cannot be read"):
            resolve_checkpoint(str(copy)).total_bytes()


def test_unusable_folders_and_names(sharded, tmp_path):
    folder, _ = sharded
    with pytest.raises(CheckpointError, match="/no/such/folder"):
        resolve_checkpoint("/no/such/folder")
    with pytest.raises(CheckpointError, match="a/b/c: neither an existing folder nor a hub id"):
        resolve_checkpoint("a/b/c")

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        resolve_checkpoint(str(no_config))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match="only safetensors"):
        resolve_checkpoint(str(pickled))


@pytest.mark.parametrize("first,then", [("20KB", "10MB"), ("10MB", "20KB")], ids=["shards-then-one", "one-then-shards"])
def test_resaved_folder_loads_what_transformers_loads(tmp_path, monkeypatch, first, then):
    """A folder saved twice keeps files of the first save: sharded then one file keeps the old index (its shards are
    gone), one file then sharded keeps the old model.safetensors. Transformers loads model.safetensors in both; so
    must a local folder and a hub id whose cache holds both."""
    folder = tmp_path / "resaved"
    saves = []
    for seed, size in ((0, first), (1, then)):
        model = tiny_llama()
        torch.manual_seed(seed)
        model.model.layers[1].mlp.down_proj.weight.data.normal_()
        model.save_pretrained(folder, max_shard_size=size)
        saves.append(model.state_dict())
    assert (folder / INDEX).is_file() and (folder / "model.safetensors").is_file()
    name = "model.layers.1.mlp.down_proj.weight"
    loaded = LlamaForCausalLM.from_pretrained(folder).state_dict()[name]
    assert any(torch.equal(loaded, s[name]) for s in saves) and not torch.equal(saves[0][name], saves[1][name])
    assert torch.equal(resolve_checkpoint(str(folder)).read(name), loaded)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    populate_hub_cache(tmp_path / "hub_cache", "org/resaved", folder, sorted(p.name for p in folder.iterdir()))
    assert torch.equal(resolve_checkpoint("org/resaved").read(name), loaded)


def test_hub_unreachable_leaves_the_choice_to_the_cache(tmp_path, monkeypatch):
    """Which weight files a repository holds (also where an index was fetched: is model.safetensors beside it?): the
    cached snapshot answers where it holds weights; else the hub, and where the hub cannot be reached the cache
    again (as downloads fall back to it), never an exception of the HTTP client. (A whole run against a hub that
    refuses connections resolves from a warm cache after huggingface_hub's retries, about a minute here: too slow
    for the suite.)"""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / INDEX).write_text("{}")
    repo = _HubRepo("org/down", "0" * 40, snapshot, str(tmp_path), offline=False)

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(HfApi, "list_repo_files", refused)
    assert repo.list_files() == [INDEX]
    (snapshot / "model.safetensors").write_bytes(b"")
    assert repo.list_files() == ["model.safetensors", INDEX]


# --- hub ids, served offline from a cache laid out as huggingface_hub lays it out ----------------------

@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    cache = tmp_path / "hub_cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_offline_reads_only_the_rank_shards(sharded, offline_hub):
    folder, state = sharded
    layer3 = [n for n in state if n.startswith(LAYER3)]
    shards = sorted({index_of(folder)[n] for n in layer3})
    # The cache holds metadata and layer 3's shards only: nothing else may be needed to read layer 3.
    metadata = ["config.json", "generation_config.json", INDEX]
    snapshot = populate_hub_cache(offline_hub, "org/tiny", folder, metadata + shards)

    ckpt = resolve_checkpoint("org/tiny")
    assert ckpt.hub_id == "org/tiny" and ckpt.root == snapshot
    assert ckpt.weight_map() == index_of(folder)
    assert ckpt.files_for(layer3) == shards
    ckpt.ensure_files(shards)
    for name in layer3:
        assert torch.equal(ckpt.read(name), state[name])
    assert ckpt.files_opened == set(shards)

    other = index_of(folder)["model.embed_tokens.weight"]
    with pytest.raises(CheckpointError, match=rf"org/tiny: {other} is not in the local Hugging Face cache"):
        ckpt.ensure_files([other])
    with pytest.raises(CheckpointError, match=other):
        ckpt.read("model.embed_tokens.weight")

    pinned = resolve_checkpoint("org/tiny", revision=COMMIT)
    assert pinned.root == snapshot


def test_hub_id_single_file_via_hf_home(single_bf16, monkeypatch, tmp_path):
    folder, state = single_bf16
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    populate_hub_cache(tmp_path / "hf_home" / "hub", "org/single", folder, ["config.json", "model.safetensors"])
    ckpt = resolve_checkpoint("org/single")
    name = "model.layers.1.self_attn.v_proj.weight"  # (16, 32)
    assert torch.equal(ckpt.read(name, dim=0, start=8, stop=16), state[name][8:16])
    assert ckpt.bytes_read == 8 * 32 * 2


def test_hub_id_missing_offline(sharded, offline_hub):
    folder, _ = sharded
    with pytest.raises(CheckpointError, match="org/absent: config.json is not in the local Hugging Face cache"):
        resolve_checkpoint("org/absent")
    populate_hub_cache(offline_hub, "org/pickled", folder, ["config.json"])
    with pytest.raises(CheckpointError, match="org/pickled: no \\*.safetensors.*only safetensors"):
        resolve_checkpoint("org/pickled")
