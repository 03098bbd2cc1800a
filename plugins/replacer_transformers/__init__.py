"""Hugging Face transformers support: self-attention across families (BERT-style, Llama-style and GPT-2
adapters, and a structural one for the rest); model loading."""

from __future__ import annotations

from replacer.hookspecs import hookimpl
from replacer_transformers.adapters import GPT2AttentionAdapter, HFProjectedAttentionAdapter, HFSelfAttentionAdapter
from replacer_transformers.cache import cache_footprint
from replacer_transformers.exporters import SentenceTransformersExporter
from replacer_transformers.lm_eval_harness import LMEvalHarness
from replacer_transformers.sentence_transformers_evaluation import SentenceTransformersEvaluation
from replacer_transformers.loading import build_model, describe_model, load_model, load_tokenizer
from replacer_transformers.structural import HFStructuralAdapter


@hookimpl
def replacer_adapters() -> list:
    return [HFSelfAttentionAdapter(), HFProjectedAttentionAdapter(), GPT2AttentionAdapter(), HFStructuralAdapter()]


@hookimpl
def replacer_exporters() -> list:
    return [SentenceTransformersExporter()]


@hookimpl
def replacer_evaluations() -> list:
    return [SentenceTransformersEvaluation(), LMEvalHarness()]


@hookimpl
def replacer_load_model(source: str, pretrained: bool, kwargs: dict):
    return load_model(source, pretrained, kwargs)


@hookimpl
def replacer_load_tokenizer(source: str):
    return load_tokenizer(source)


@hookimpl
def replacer_describe_model(model):
    return describe_model(model)


@hookimpl
def replacer_build_model(origin: dict):
    return build_model(origin)


@hookimpl
def replacer_cache_footprint(model, batch: dict):
    return cache_footprint(model, batch)
