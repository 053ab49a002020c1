"""Exports of a portable checkpoint for other ecosystems: `export_hf` writes a Hugging Face folder
(`AutoConfig` / `AutoModel.from_pretrained(dir, trust_remote_code=True)`, `AutoTokenizer`)."""

from biomask.export.hf import export_hf

__all__ = ["export_hf"]
