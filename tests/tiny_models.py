"""Build tiny random-weight Qwen checkpoints on disk, for tests and offline checks.

Each checkpoint is what a user's download looks like: config.json, safetensors
weights, a tokenizer trained here, a Qwen chat template and (for multimodal models)
the processor's files. The tool loads them back through `from_pretrained`.

    python tests/tiny_models.py OUTDIR      # writes OUTDIR/qwen2, qwen2_5_vl, qwen2_5_omni

With --full-size the same checkpoints keep the real configs' sizes (Qwen2.5-3B-Instruct,
Qwen2.5-VL-3B-Instruct, Qwen2.5-Omni-3B) with random weights in bfloat16 (token2wav in
float32, as published): decode speed does not depend on the weights' values, so these
measure the tool on real-size models without downloading them.

    python tests/tiny_models.py OUTDIR --full-size --device cuda --only qwen2 qwen2_5_omni
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run_multimodal  # noqa: E402

SHARED_CONFIGS = Path(__file__).resolve().parent / "configs"  # copies of ../shared/model_configs

# The special tokens of Qwen2.5 checkpoints, in their published order (ids 151643...).
QWEN_TEXT_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2.5-Omni renames some of them (its ids 151646-151656).
QWEN_OMNI_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>",
    "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
]

# Qwen's chat format: a default system turn, <|im_start|>role\n ... <|im_end|>\n per turn,
# media placeholders inside the user turn, and "<|im_start|>assistant\n" to answer.
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_OMNI_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The cat sat on the warm blanket and looked at the camera.",
    "A cup of coffee stands on a wooden table in the morning light.",
    "Quantum computers use qubits, which can be in a superposition of states.",
    "Describe this image and explain what is happening in it.",
    "What animal is in this picture, and what is it doing?",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Explain quantum computing in simple terms, please.",
]


def train_tokenizer(specials: list[str], template: str):
    """A tokenizer trained here, with Qwen's pre-tokenizer, special tokens and chat template."""
    return run_multimodal.train_tokenizer(CORPUS, specials, template)


def _token_ids(tok, names: dict[str, str]) -> dict[str, int]:
    return {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}


def _merge(base: dict, overrides: dict) -> dict:
    """A copy of base with overrides merged in, nested dicts included."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _real_config(name: str) -> dict:
    return json.loads((SHARED_CONFIGS / name / "config.json").read_text())


def _random_model(model_class, config, full_size: bool, device: str, built_in_bf16: bool = False):
    """Random weights: float32 when tiny (exact references), bfloat16 at full size (made in bfloat16 with
    `built_in_bf16`: a model too big for float32 on the card)."""
    import torch

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    if full_size and built_in_bf16:
        torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    if full_size:
        for name, part in model.named_children():
            if name != "token2wav":   # published in float32, and run in float32
                part.to(torch.bfloat16)
    return model


# initializer_range 0.2 (not 0.02): a random model with near-flat logits answers "\n\n\n...".
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, max_window_layers=2, initializer_range=0.2)
VISION = dict(depth=2, hidden_size=32, embed_dim=32, intermediate_size=64, num_heads=2,
              out_hidden_size=64, fullatt_block_indexes=[1])


def build_qwen2(out: Path, full_size: bool = False, device: str = "cpu",
                config_name: str = "Qwen--Qwen2.5-3B-Instruct") -> Path:
    """Text-only: the self-test's tiny Qwen2 with all of Qwen2.5's special tokens, or a real-size one."""
    if not full_size:
        return run_multimodal.build_tiny_qwen2(out, CORPUS, QWEN_TEXT_SPECIALS)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_tokenizer(QWEN_TEXT_SPECIALS, run_multimodal.QWEN_CHAT_TEMPLATE)
    ids = _token_ids(tok, dict(bos_token_id="<|endoftext|>", eos_token_id="<|im_end|>"))
    config = Qwen2Config.from_dict(_merge(_real_config(config_name), ids))
    _random_model(Qwen2ForCausalLM, config, full_size, device).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _image_processor(patch_size: int = 14):
    from transformers import Qwen2VLImageProcessor
    return Qwen2VLImageProcessor(patch_size=patch_size)


def _video_processor(patch_size: int = 14):
    from transformers import Qwen2VLVideoProcessor
    return Qwen2VLVideoProcessor(patch_size=patch_size)


def build_qwen2_5_vl(out: Path, full_size: bool = False, device: str = "cpu") -> Path:
    """Qwen2.5-VL-3B-Instruct's config; tiny: 2 text layers of 64 and a 2-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok = train_tokenizer(QWEN_TEXT_SPECIALS, QWEN_VL_TEMPLATE)
    overrides = _token_ids(tok, dict(
        bos_token_id="<|endoftext|>", eos_token_id="<|im_end|>", vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>", vision_token_id="<|vision_pad|>", image_token_id="<|image_pad|>",
        video_token_id="<|video_pad|>"))
    if not full_size:
        overrides.update(TEXT, vocab_size=len(tok), vision_config=VISION,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config = Qwen2_5_VLConfig.from_dict(_merge(_real_config("Qwen--Qwen2.5-VL-3B-Instruct"), overrides))
    _random_model(Qwen2_5_VLForConditionalGeneration, config, full_size, device).save_pretrained(out)
    Qwen2_5_VLProcessor(image_processor=_image_processor(), tokenizer=tok, video_processor=_video_processor(),
                        chat_template=QWEN_VL_TEMPLATE).save_pretrained(out)
    return out


OMNI_NAMED_TOKENS = dict(image_token="<|IMAGE|>", audio_token="<|AUDIO|>", video_token="<|VIDEO|>",
                         vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
                         audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>")
SPEAKERS = ("Chelsie", "Ethan")
TINY_OMNI = dict(
    thinker_config=dict(
        text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        audio_config=dict(d_model=32, encoder_layers=2, num_hidden_layers=2, encoder_attention_heads=2,
                          encoder_ffn_dim=64, output_dim=64),
        vision_config=VISION),
    talker_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=16, intermediate_size=64, embedding_size=64, max_window_layers=2,
                       rope_scaling={"type": "default", "rope_type": "default", "mrope_section": [4, 4, 0]}),
    token2wav_config=dict(
        # transformers 5 reads hidden_size/num_hidden_layers/num_attention_heads; the
        # published config spells them dim/depth/heads, so set both.
        # num_embeds: a random talker emits any of its 8448 codes, the real one only the first 8193;
        # a codebook as large as the talker's vocabulary keeps token2wav from indexing past its end.
        dit_config=dict(num_embeds=8448,
                        dim=32, depth=2, heads=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        look_ahead_layers=[1], look_backward_layers=[0], head_dim=16, ff_mult=2, emb_dim=16,
                        enc_channels=[16, 16, 16, 16, 48], enc_dim=16, enc_emb_dim=16, enc_lin_neurons=16,
                        enc_attention_channels=8, enc_se_channels=8),
        bigvgan_config=dict(upsample_initial_channel=128, resblock_kernel_sizes=[3],
                            resblock_dilation_sizes=[[1, 3, 5]])),
)


def build_qwen2_5_omni(out: Path, full_size: bool = False, device: str = "cpu") -> Path:
    """Qwen2.5-Omni-3B's config: thinker (text, vision, audio), talker, token2wav and two voices."""
    import torch
    from transformers import (Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor,
                              WhisperFeatureExtractor)

    tok = train_tokenizer(QWEN_OMNI_SPECIALS, QWEN_OMNI_TEMPLATE)
    tok._set_model_specific_special_tokens(OMNI_NAMED_TOKENS)
    media = _token_ids(tok, dict(
        audio_token_index="<|AUDIO|>", audio_start_token_id="<|audio_bos|>", audio_end_token_id="<|audio_eos|>",
        image_token_index="<|IMAGE|>", video_token_index="<|VIDEO|>", vision_start_token_id="<|vision_bos|>",
        vision_end_token_id="<|vision_eos|>", vision_token_id="<|vision_pad|>"))
    special = _token_ids(tok, dict(bos_token_id="<|im_start|>", eos_token_id="<|im_end|>",
                                   pad_token_id="<|endoftext|>"))
    overrides = dict(thinker_config=dict(media, **special, user_token_id=tok.convert_tokens_to_ids("user")),
                     talker_config=dict(media))
    if not full_size:
        # The talker reads three thinker-vocabulary ids of its own (unused rows in the real vocab).
        overrides["talker_config"].update(_token_ids(tok, dict(
            tts_text_pad_token_id="<|box_end|>", tts_text_start_token_id="<|quad_start|>",
            tts_text_end_token_id="<|quad_end|>")))
        overrides = _merge(TINY_OMNI, overrides)
        overrides["thinker_config"]["text_config"]["vocab_size"] = len(tok)
    else:
        overrides["token2wav_config"] = {"dit_config": {"num_embeds": 8448}}   # as above: random talker codes
    config = Qwen2_5OmniConfig.from_dict(_merge(_real_config("Qwen--Qwen2.5-Omni-3B"), overrides))
    _random_model(Qwen2_5OmniForConditionalGeneration, config, full_size, device).save_pretrained(out)
    voice_size = config.token2wav_config.dit_config.enc_emb_dim
    speakers = {name: {"cond": torch.randn(voice_size), "ref_mel": torch.randn(1, 30, 80),
                       "bos_token": tok.convert_tokens_to_ids("<|endoftext|>")} for name in SPEAKERS}
    torch.save(speakers, out / "spk_dict.pt")
    Qwen2_5OmniProcessor(image_processor=_image_processor(), video_processor=_video_processor(),
                         feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
                         chat_template=QWEN_OMNI_TEMPLATE).save_pretrained(out)
    return out


TINY_QWEN3_OMNI_THINKER = dict(
    text_config=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                     max_position_embeddings=4096, initializer_range=0.2,
                     rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
    audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64,
                      num_mel_bins=128, downsample_hidden_size=16),
    vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                       deepstack_visual_indexes=[1], num_position_embeddings=64))


TINY_QWEN3_OMNI_TALKER = dict(   # Qwen3-Omni-30B-A3B's talker and code2wav, their sizes cut down
    text_config=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                     shared_expert_intermediate_size=64,
                     rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "interleaved": True}),
    code_predictor_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, num_code_groups=16, vocab_size=2048,
                               layer_types=["full_attention"]),
    thinker_hidden_size=64, accept_hidden_layer=1)
TINY_QWEN3_OMNI_CODE2WAV = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=4, decoder_dim=64, codebook_dim=32,
                                vector_quantization_hidden_dimension=32)


def build_qwen3_omni(out: Path, full_size: bool = False, device: str = "cpu", talker: bool = False) -> Path:
    """A Qwen3-Omni (qwen3_omni_moe) checkpoint: the MoE thinker with vision and audio; with `talker`, the
    talker (its code predictor inside) and code2wav of Qwen3-Omni-30B-A3B-Instruct's config too, and its
    voices. Tiny unless `full_size` (the real config whole)."""
    model, processor = qwen3_omni(full_size, device, talker)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def qwen3_omni(full_size: bool = False, device: str = "cpu", talker: bool = False):
    """(model, processor) of build_qwen3_omni, in memory: at full size (bfloat16, about 70 GB with the talker)
    too big to save on a lent GPU machine's disk, so benchmarks make it where they run."""
    from transformers import (Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeProcessor,
                              WhisperFeatureExtractor)

    tok = train_tokenizer(QWEN_OMNI_SPECIALS, QWEN_OMNI_TEMPLATE)
    tok._set_model_specific_special_tokens(OMNI_NAMED_TOKENS)
    tok.add_tokens(["assistant", "user", "system"])   # one token each, as in Qwen's vocabulary: the talker finds
    media = _token_ids(tok, dict(                      # the assistant's turn by <|im_start|>assistant
        audio_token_id="<|AUDIO|>", image_token_id="<|IMAGE|>", video_token_id="<|VIDEO|>",
        vision_start_token_id="<|vision_bos|>", audio_start_token_id="<|audio_bos|>"))
    roles = {f"{role}_token_id": tok.convert_tokens_to_ids(role) for role in ("assistant", "user", "system")}
    top = dict(roles, **_token_ids(tok, dict(im_start_token_id="<|im_start|>", im_end_token_id="<|im_end|>",
                                             tts_pad_token_id="<|box_end|>", tts_bos_token_id="<|quad_start|>",
                                             tts_eos_token_id="<|quad_end|>")))
    thinker = dict(media, user_token_id=roles["user_token_id"])
    thinker["text_config"] = dict(**({} if full_size else {"vocab_size": len(tok)}), **_token_ids(tok, dict(
        bos_token_id="<|im_start|>", eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>")))
    real = _real_config("Qwen--Qwen3-Omni-30B-A3B-Instruct")
    if full_size:
        thinker = _merge(real["thinker_config"], thinker)
        parts = dict(talker_config=_merge(real["talker_config"], dict(media, audio_end_token_id=tok.convert_tokens_to_ids(
            "<|audio_eos|>"))), code2wav_config=real["code2wav_config"]) if talker else {}
    else:
        thinker = _merge(TINY_QWEN3_OMNI_THINKER, thinker)
        parts = dict(talker_config=_merge(real["talker_config"], _merge(TINY_QWEN3_OMNI_TALKER, dict(
            media, audio_end_token_id=tok.convert_tokens_to_ids("<|audio_eos|>")))),
            code2wav_config=_merge(real["code2wav_config"], TINY_QWEN3_OMNI_CODE2WAV)) if talker else {}
    config = Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=talker, **parts, **(top if talker else {}))
    model = _random_model(Qwen3OmniMoeForConditionalGeneration, config, full_size, device, built_in_bf16=True)
    if talker:   # transformers (5.17-5.25) leaves the talker's experts uninitialised: whatever the memory held
        import torch
        with torch.no_grad():
            for name, weight in model.talker.named_parameters():
                if ".experts." in name:
                    weight.normal_(0.0, config.talker_config.text_config.initializer_range)
            if not full_size:   # random weights speak at about 1e-6, below a 16-bit WAV's step: made audible
                last = model.code2wav.decoder[-1].conv
                last.weight.mul_(0.3 / model.code2wav(torch.zeros((1, 16, 8), dtype=torch.long, device=last.weight.device)).abs().max())
    patch = config.thinker_config.vision_config.patch_size   # 16 in Qwen3-Omni
    return model.eval(), Qwen3OmniMoeProcessor(
        image_processor=_image_processor(patch), video_processor=_video_processor(patch),
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok, chat_template=QWEN_OMNI_TEMPLATE)


def build_qwen3_omni_speaking(out: Path, full_size: bool = False, device: str = "cpu") -> Path:
    return build_qwen3_omni(out, full_size, device, talker=True)


def build_overflowing_qwen2(out: Path, source: Path, scale: float = 40.0, poison: bool = False) -> Path:
    """The tiny Qwen2 with layer 0's MLP weights scaled by `scale` (at most ~33, finite in float16): its
    activations overflow float16 at the first token, and stay finite in bfloat16 and float32. With
    `poison`, one weight is NaN: its logits are NaN in every dtype (a damaged checkpoint)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, out)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(model.model.layers[0].mlp, name).weight.mul_(scale)
        if poison:
            model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(out)
    return out


BUILDERS = {"qwen2": build_qwen2, "qwen2_5_vl": build_qwen2_5_vl, "qwen2_5_omni": build_qwen2_5_omni,
            "qwen3_omni": build_qwen3_omni, "qwen3_omni_speaking": build_qwen3_omni_speaking}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--full-size", action="store_true", help="keep the real configs' sizes")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster)")
    parser.add_argument("--only", nargs="+", choices=sorted(BUILDERS), default=sorted(BUILDERS))
    parser.add_argument("--text-config", default="Qwen--Qwen2.5-3B-Instruct",
                        help="the real config of the full-size text model (a folder name in tests/configs)")
    args = parser.parse_args()
    for name in args.only:
        extra = {"config_name": args.text_config} if name == "qwen2" and args.full_size else {}
        print(BUILDERS[name](args.outdir / name, full_size=args.full_size, device=args.device, **extra))
