"""Special tokens shared by every biomask vocabulary (DNA tokenizers and gene vocabularies).

Their ids are fixed so that masking, padding and pooling code never has to look them up.
"""

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
PAD_ID, CLS_ID, SEP_ID, MASK_ID, UNK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL = len(SPECIAL_TOKENS)


def tokenizer_config(biomask: dict) -> dict:
    """The `tokenizer_config.json` saved beside a tokenizer.json: what `transformers`'
    `PreTrainedTokenizerFast` needs to know the specials, plus biomask's own settings."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "unk_token": "[UNK]",
        "biomask": biomask,
    }
