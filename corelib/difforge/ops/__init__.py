"""Operations model code calls so that plugins can serve them (attention kernels, ...)."""

from .attention import attention, attention_backend, current_attention_backend, use_attention

__all__ = ["attention", "attention_backend", "current_attention_backend", "use_attention"]
