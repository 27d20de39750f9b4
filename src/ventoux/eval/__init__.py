"""Evaluation: perplexity, local multiple-choice and generation tasks, and an lm-evaluation-harness backend.

    from ventoux.eval import perplexity, read_documents
    result = perplexity(llm.model, llm.tokenizer, read_documents(["wiki.txt"]), context=2048, stride=1024)

The CLI is `ventoux eval perplexity|tasks` (commands/eval.py); lm-eval reaches ventoux through
ventoux.eval.lm_eval_backend (the `ventoux` model).
"""

from .data import Document, read_documents
from .perplexity import perplexity, strided_loss
from .scoring import score
from .tasks import read_task, read_tasks, run_task

__all__ = ["Document", "perplexity", "read_documents", "read_task", "read_tasks", "run_task", "score", "strided_loss"]
