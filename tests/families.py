"""The families the coverage test runs (tiny random-init configs, no downloads), and the README table
rendered from them.

Each entry says what is expected: `supported` (every attention site replaced), `partial` (some
sites listed unsupported, the rest replaced) or `unsupported` (scan lists every site with its reason).
`.venv/bin/python tests/families.py --write` re-renders the README's families table from a scan of each.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
import transformers as T

T.logging.set_verbosity_error()

Inputs = Callable[[], tuple[tuple, dict]]


@dataclass(frozen=True)
class Family:
    name: str
    library: str
    build: Callable[[], torch.nn.Module]
    inputs: Inputs
    expect: str = "supported"
    rebuild: bool = True  # False: built at sizes timm keeps no record of, so loading needs base= (default sizes rebuild)


def _ids(n: int = 9) -> Inputs:
    return lambda: ((), {"input_ids": torch.randint(1, 90, (2, n))})


def _pixels(size: int = 32) -> Inputs:
    return lambda: ((), {"pixel_values": torch.randn(2, 3, size, size)})


def _image(size: int) -> Inputs:
    return lambda: ((torch.randn(2, 3, size, size),), {})


_TINY = dict(pad_token_id=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             vocab_size=100, num_key_value_heads=2, max_position_embeddings=64, head_dim=8)


def _hf(model_type: str, cls: str, drop: tuple[str, ...] = (), **extra) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        settings = {k: v for k, v in {**_TINY, **extra}.items() if k not in drop}
        return getattr(T, cls)(T.AutoConfig.for_model(model_type, **settings))

    return build


def _timm(name: str, **kwargs) -> Callable[[], torch.nn.Module]:
    return lambda: timm.create_model(name, num_classes=4, **kwargs)


def _seq2seq(cls: str, config: str, **extra) -> Callable[[], torch.nn.Module]:
    sizes = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64, pad_token_id=0)
    return lambda: getattr(T, cls)(getattr(T, config)(**{**sizes, **extra}))


def _with_decoder(encoder: Inputs) -> Inputs:
    def make() -> tuple[tuple, dict]:
        args, kwargs = encoder()
        return args, {**kwargs, "decoder_input_ids": torch.randint(1, 90, (2, 5))}

    return make


_CROSS = "partial: cross-attention"
FAMILIES: list[Family] = [
    # transformers encoders
    Family("BERT", "transformers", _hf("bert", "BertModel"), _ids()),
    Family("RoBERTa", "transformers", _hf("roberta", "RobertaModel"), _ids()),
    Family("DistilBERT", "transformers", _hf("distilbert", "DistilBertModel"), _ids()),
    Family("ALBERT", "transformers", _hf("albert", "AlbertModel"), _ids()),
    Family("ELECTRA", "transformers", _hf("electra", "ElectraModel"), _ids()),
    Family("DeBERTa-v2", "transformers", _hf("deberta-v2", "DebertaV2Model"), _ids()),
    Family("MPNet", "transformers", _hf("mpnet", "MPNetModel"), _ids()),
    Family("ModernBERT", "transformers", _hf("modernbert", "ModernBertModel"), _ids()),
    Family("RoFormer", "transformers", _hf("roformer", "RoFormerModel"), _ids()),
    # transformers decoders
    Family("GPT-2", "transformers", _hf("gpt2", "GPT2LMHeadModel"), _ids()),
    Family("GPT-Neo", "transformers", lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(
        hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], vocab_size=100,
        max_position_embeddings=64, window_size=8)), _ids()),
    Family("GPT-NeoX / Pythia", "transformers", _hf("gpt_neox", "GPTNeoXForCausalLM"), _ids()),
    Family("GPT-J", "transformers", _hf("gptj", "GPTJForCausalLM", rotary_dim=4), _ids()),
    Family("CodeGen", "transformers", _hf("codegen", "CodeGenForCausalLM", rotary_dim=4), _ids()),
    Family("OPT", "transformers", _hf("opt", "OPTForCausalLM"), _ids()),
    Family("BLOOM", "transformers", _hf("bloom", "BloomForCausalLM"), _ids()),
    Family("Falcon", "transformers", _hf("falcon", "FalconForCausalLM", drop=("head_dim",), new_decoder_architecture=True, num_kv_heads=2), _ids()),
    Family("MPT", "transformers", _hf("mpt", "MptForCausalLM"), _ids()),
    Family("StarCoder (GPTBigCode)", "transformers", _hf("gpt_bigcode", "GPTBigCodeForCausalLM"), _ids()),
    Family("Phi", "transformers", _hf("phi", "PhiForCausalLM"), _ids()),
    Family("Phi-3", "transformers", _hf("phi3", "Phi3ForCausalLM"), _ids()),
    Family("Llama", "transformers", _hf("llama", "LlamaForCausalLM"), _ids()),
    Family("Mistral", "transformers", _hf("mistral", "MistralForCausalLM"), _ids()),
    Family("Qwen2", "transformers", _hf("qwen2", "Qwen2ForCausalLM"), _ids()),
    Family("Qwen3", "transformers", _hf("qwen3", "Qwen3ForCausalLM"), _ids()),
    Family("Gemma2", "transformers", _hf("gemma2", "Gemma2ForCausalLM"), _ids()),
    Family("OLMo2", "transformers", _hf("olmo2", "Olmo2ForCausalLM"), _ids()),
    Family("StableLM", "transformers", _hf("stablelm", "StableLmForCausalLM"), _ids()),
    Family("Persimmon", "transformers", _hf("persimmon", "PersimmonForCausalLM"), _ids()),
    Family("XGLM", "transformers", _hf("xglm", "XGLMForCausalLM"), _ids()),
    Family("BioGPT", "transformers", _hf("biogpt", "BioGptForCausalLM"), _ids()),
    Family("Mixtral (MoE)", "transformers", _hf("mixtral", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2), _ids()),
    Family("DeepSeek-V3 (latent attention, MoE)", "transformers", _hf(
        "deepseek_v3", "DeepseekV3ForCausalLM", drop=("head_dim",), num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, kv_lora_rank=16,
        q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, first_k_dense_replace=1,
        moe_intermediate_size=16), _ids()),
    Family("MobileBERT", "transformers", _hf("mobilebert", "MobileBertModel", embedding_size=32, intra_bottleneck_size=32),
           _ids(), "unsupported: calling convention"),
    Family("Longformer", "transformers", _hf("longformer", "LongformerModel", attention_window=4), _ids(), "unsupported: sliding-window"),
    # transformers encoder-decoders
    Family("T5", "transformers", lambda: T.T5Model(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=100)),
           _with_decoder(_ids()), _CROSS),
    Family("BART", "transformers", _seq2seq("BartModel", "BartConfig"), _ids(), _CROSS),
    Family("Whisper", "transformers", _seq2seq("WhisperModel", "WhisperConfig", num_mel_bins=8, max_source_positions=16, max_target_positions=16),
           _with_decoder(lambda: ((), {"input_features": torch.randn(2, 8, 32)})), _CROSS),
    # transformers vision, audio, vision-language encoders
    Family("ViT", "transformers", _hf("vit", "ViTModel", image_size=32, patch_size=8), _pixels()),
    Family("BEiT", "transformers", _hf("beit", "BeitModel", image_size=32, patch_size=8), _pixels()),
    Family("DINOv2", "transformers", _hf("dinov2", "Dinov2Model", image_size=32, patch_size=8), _pixels()),
    Family("Swin (transformers)", "transformers", lambda: T.SwinModel(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)), _pixels()),
    Family("CLIP vision", "transformers", lambda: T.CLIPVisionModel(T.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)), _pixels()),
    Family("CLIP text", "transformers", lambda: T.CLIPTextModel(T.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100, max_position_embeddings=64)), _ids()),
    Family("SigLIP vision", "transformers", lambda: T.SiglipVisionModel(T.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)), _pixels(),
        "partial: attention pooling"),
    Family("wav2vec 2.0", "transformers", lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
        conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)), lambda: ((), {"input_values": torch.randn(2, 800)})),
    # timm
    Family("ViT / DeiT", "timm", _timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), _image(32)),
    Family("EVA-02", "timm", _timm("eva02_tiny_patch14_224", img_size=28, depth=2), _image(28)),
    Family("BEiT (timm)", "timm", _timm("beit_base_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4), _image(32)),
    Family("ViT rel-pos", "timm", _timm("vit_relpos_small_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4), _image(32)),
    Family("Swin", "timm", _timm("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1), num_heads=(2, 4), embed_dim=32), _image(56)),
    Family("Swin v2", "timm", _timm("swinv2_tiny_window8_256", img_size=64, depths=(1, 1), num_heads=(2, 4), embed_dim=32, window_size=4), _image(64)),
    Family("CaiT", "timm", _timm("cait_xxs24_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4, depth_token_only=1),
           _image(32), "partial: class attention", rebuild=False),
    Family("ConViT", "timm", _timm("convit_tiny", img_size=32, patch_size=8, depth=2, local_up_to_layer=1, embed_dim=32, num_heads=4), _image(32), rebuild=False),
    Family("PVT v2", "timm", _timm("pvt_v2_b0", depths=(1, 1, 1, 1)), _image(64), rebuild=False),
    Family("Twins", "timm", _timm("twins_svt_small", depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4)), _image(64), rebuild=False),
    Family("LeViT", "timm", _timm("levit_128s", img_size=64), _image(64), "partial: downsampling attention", rebuild=False),
    Family("TNT", "timm", _timm("tnt_s_patch16_224", img_size=32, depth=2), _image(32), rebuild=False),
    Family("MobileViT", "timm", _timm("mobilevit_xxs"), _image(64)),
    Family("MaxViT", "timm", _timm("maxvit_rmlp_pico_rw_256", img_size=64, depths=(1, 1, 1, 1)), _image(64), rebuild=False),
    Family("SAM ViT", "timm", _timm("samvit_base_patch16", img_size=64, depth=2, embed_dim=32, num_heads=4, global_attn_indexes=(1,),
                                    window_size=2, neck_chans=16), _image(64), rebuild=False),
    Family("FastViT (attention stages)", "timm", _timm("fastvit_sa12", layers=(1, 1, 1, 1)), _image(64), rebuild=False),
    Family("DaViT", "timm", _timm("davit_tiny", depths=(1, 1, 1, 1)), _image(64), "partial: channel attention", rebuild=False),
    Family("XCiT", "timm", _timm("xcit_nano_12_p16_224", img_size=32, depth=2), _image(32), "unsupported: channel attention"),
    Family("EdgeNeXt", "timm", _timm("edgenext_xx_small", depths=(1, 1, 1, 1)), _image(64), "unsupported: channel attention"),
    Family("MViT v2", "timm", _timm("mvitv2_tiny"), _image(224), "unsupported: pooling attention"),
    Family("Hiera", "timm", _timm("hiera_tiny_224"), _image(224), "unsupported: pooling attention"),
    Family("GC ViT", "timm", _timm("gcvit_xxtiny"), _image(224), "unsupported: second input"),
    Family("MobileViT v2", "timm", _timm("mobilevitv2_050"), _image(64), "unsupported: separable linear attention"),
]

MARKERS = ("<!-- families:start -->", "<!-- families:end -->")


def status(family: Family) -> str:
    return family.expect.partition(":")[0]


def render() -> str:
    """The README's families table, from a scan of each family's tiny model."""
    import replacer

    rows = ["| family | library | status | adapter | sites (causal) | notes |", "|---|---|---|---|---|---|"]
    for family in FAMILIES:
        torch.manual_seed(0)
        found = replacer.scan(family.build())
        adapters = sorted({s.adapter for s in found.sites}) or ["-"]
        causal = sorted({"yes" if s.causal else "no" for s in found.sites})
        notes = sorted({s.note for s in found.sites if s.note} | {f"unsupported `{u.cls.rsplit('.', 1)[-1]}`: {u.reason}" for u in found.unsupported})
        sites = f"{len(found.sites)} ({'/'.join(causal)})" if found.sites else "0"
        rows.append(f"| {family.name} | {family.library} | {status(family)} | {', '.join(adapters)} | {sites} | {'; '.join(notes)} |")
    return "\n".join(rows)


def readme_table(readme: str) -> str:
    start, end = (readme.index(m) for m in MARKERS)
    return readme[start + len(MARKERS[0]) : end].strip()


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "README.md"
    table = render()
    if "--write" in sys.argv:
        text = path.read_text(encoding="utf-8")
        start, end = (text.index(m) for m in MARKERS)
        path.write_text(text[: start + len(MARKERS[0])] + "\n" + table + "\n" + text[end:], encoding="utf-8")
    print(table)
