"""The tiny checkpoints' tokenizer: a small Qwen2-style byte-level BPE trained here on a fixed corpus (no
download), saved with the official `llm/` tokenizer file set.

    from nvila_ft.demo.tokenizer import build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer()      # a Qwen2Tokenizer of TOKENIZER_SIZE (1024) tokens
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Qwen2 special tokens, in id order right after the BPE vocab (as in the parity tokenizer).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Tokenizer length: BPE vocab + the 3 special tokens. A multiple of 8, so the embedding has exactly one row
# per token, like the parity checkpoints (8192 rows for 8192 tokens).
TOKENIZER_SIZE = 1024
# Qwen2 chat template as stored in the official NVILA `llm/tokenizer_config.json` (the default system
# prompt has no final period).
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{% endif %}{% for message in messages if message['content'] is not none %}{{ '<|im_start|>' + message['role']"
    " + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the tiny BPE: plain English with the radiology words of VQA-RAD-style questions.
CORPUS = """\
You are a helpful assistant. Describe the image in detail. What is shown in this picture? Answer the question
using a single word or phrase. Is there anything unusual in the image? Please look carefully and explain.

Radiology is the medical specialty that uses imaging to diagnose and treat disease. The most common imaging
modality is the plain radiograph, also called an x-ray. Computed tomography (CT) uses many x-ray projections to
build cross-sectional images, and magnetic resonance imaging (MRI) uses strong magnets and radio waves. Ultrasound
uses sound waves and is safe in pregnancy. Each modality has its strengths: CT is fast, MRI shows soft tissue
contrast, and ultrasound is cheap and portable.

Which organ system is evaluated? Is this a CT or an MRI? Is the image taken in the axial, coronal or sagittal plane?
Was contrast given? Is this a T1 or a T2 weighted image? Is this an MRI of the brain? Yes. No. Is the lesion in the
left or the right lung? The answer is yes. The answer is no. Where is the abnormality located?

The chest x-ray shows the heart, the lungs, the ribs and the diaphragm. A normal heart is less than half of the
width of the chest. Pneumonia appears as an opacity in the lung; a pneumothorax is air outside the lung; a pleural
effusion is fluid that blunts the costophrenic angle. Cardiomegaly means the heart is enlarged. There is no mass,
no nodule and no fracture.

The head CT shows the brain, the ventricles and the skull. An acute hemorrhage is bright on CT; an infarct becomes
dark after some hours. Midline shift, edema and herniation are signs of raised pressure. MRI of the head is better
for the posterior fossa, the brainstem and small white matter lesions.

The abdomen contains the liver, the gallbladder, the pancreas, the spleen, the kidneys, the stomach, the small bowel
and the colon. On ultrasound, gallstones cast an acoustic shadow. An obstruction dilates the bowel loops with
air-fluid levels. The aorta runs next to the spine; an aneurysm is a dilated aorta wider than three centimeters.

Findings: 1. There is a 2.5 cm hypodense lesion in the right lobe of the liver. 2. The kidneys are normal in size.
3. No free fluid. Impression: likely a benign cyst; follow-up in 6 months is recommended. Patient age 45, male.
The scan was performed on 12/03/2021 at 10:30 with 100 ml of intravenous contrast.

In the photograph, a person in a white spacesuit stands in front of a flag; a cup of coffee sits on a wooden
table next to a laptop, a phone and a notebook. The sky is blue, the grass is green and the dog is running quickly
toward the children who are playing with a red ball. How many people are there? What color is the car?

MRI sequences differ by contrast: fluid is bright on T2 and dark on T1, fat is bright on both, and FLAIR suppresses
the signal of cerebrospinal fluid. Diffusion weighted imaging detects acute stroke within minutes. Mammography
screens the breast for calcifications; fluoroscopy follows barium through the esophagus; nuclear medicine and PET
measure metabolism. Doppler ultrasound measures blood flow in arteries and veins, for example in deep venous
thrombosis of the leg. Pelvis, spine, shoulder, knee and wrist radiographs look for fractures and dislocations.
"""


def build_tiny_tokenizer(model_max_length: int = 8192) -> Qwen2Tokenizer:
    """Trains a small Qwen2-style byte-level BPE on the built-in corpus and wraps it as a `Qwen2Tokenizer`.

    Same pipeline as Qwen2's tokenizer (NFC, Qwen2 split regex, byte-level), so any text encodes. Ids
    0..TOKENIZER_SIZE-4 are the BPE vocab (all 256 bytes included), then `<|endoftext|>`, `<|im_start|>`,
    `<|im_end|>` as special tokens. eos `<|im_end|>`, pad `<|endoftext|>`, no bos; Qwen2 chat template.
    Training is deterministic (fixed corpus, single BPE trainer).

    Args:
        model_max_length: the tokenizer's `model_max_length` in tokens.

    Returns:
        A `Qwen2Tokenizer` of length TOKENIZER_SIZE (1024).

    Raises:
        RuntimeError: if the corpus is too small for the BPE vocab (edit CORPUS or TOKENIZER_SIZE).
    """
    bpe_size = TOKENIZER_SIZE - len(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(
        vocab_size=bpe_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    if tok.get_vocab_size() != bpe_size:
        raise RuntimeError(
            f"nvila_ft/demo/tokenizer.py: the BPE corpus yields {tok.get_vocab_size()} tokens, not {bpe_size}; "
            "lengthen CORPUS or lower TOKENIZER_SIZE."
        )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return Qwen2Tokenizer(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        add_prefix_space=False,
        errors="replace",
        split_special_tokens=False,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer(tokenizer: Qwen2Tokenizer, out: Path) -> None:
    """Saves `tokenizer` with the official file set (v5 writes tokenizer.json/tokenizer_config.json only)."""
    tokenizer.save_pretrained(out, save_jinja_files=False)  # chat template inside tokenizer_config.json
    # Slow-tokenizer files of the official layout: vocab.json + merges.txt, added_tokens.json,
    # special_tokens_map.json, and the 4.x tokenizer_config keys.
    tokenizer.backend_tokenizer.model.save(str(out))
    added = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    write_json(out / "added_tokens.json", added)
    token_entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    write_json(
        out / "special_tokens_map.json",
        {
            "additional_special_tokens": [IM_START, IM_END],
            "eos_token": {"content": IM_END, **token_entry},
            "pad_token": {"content": ENDOFTEXT, **token_entry},
        },
    )
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["additional_special_tokens"] = [IM_START, IM_END]
    config["added_tokens_decoder"] = {
        str(i): {"content": t, **token_entry, "special": True} for t, i in added.items()
    }
    write_json(config_path, config)
