"""A rare intent in short texts, marked by a few keywords, told apart by a bag-of-words MLP.

Documents are 24 tokens of a 256-token vocabulary. A common document belongs to one of four
topics: each token comes from the topic's own 24 words with probability 0.4, otherwise
from the general vocabulary. A rare document (3 %) is a common one of any topic with two
of its tokens replaced by keywords of the rare intent (8 words no common document uses),
labelled by a class of its own: two tokens among 24, so the mean-pooled embedding carries
the intent only weakly. The model averages token embeddings and classifies with an MLP,
as text classifiers over pooled embeddings do. The downstream task relabels common
documents by the next topic, with no rare intent.

The family was added after the shipped rare-signal rules (RareProbeLossJumpOnUpdateSurge
among them) were chosen, as a held-out check of them; its calibration read the rare
accuracy alone, never an alert. It has no edge-of-stability controls (no rate measured to
reach the edge).
"""

from __future__ import annotations

import torch
from torch import nn

from detection_families.base import Batch, FamilySettings, ProbesFromExamples

VOCABULARY = 256
LENGTH = 24
TOPICS = 4
TOPIC_WORDS = 24
TOPIC_SHARE = 0.4
KEYWORDS = 8
KEYWORDS_PER_DOCUMENT = 2
RARE = TOPICS  # the rare intent's class
# Token ids: each topic's words, then the rare intent's keywords, then general words.
KEYWORD_START = TOPICS * TOPIC_WORDS
GENERAL_START = KEYWORD_START + KEYWORDS


class MeanPooledClassifier(nn.Module):
    """Token embeddings averaged over the document, then a two-layer MLP."""

    def __init__(self, width: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, width)
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                                  nn.Linear(hidden, RARE + 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(dim=1))


class KeywordTextTask(ProbesFromExamples):
    name = "keyword_text"
    settings = FamilySettings(learning_rate=3e-3, batch_size=64, rare_fraction=0.03,
                              classes=RARE + 1, base_weight_decay=0.0, lr_spike_factor=30.0,
                              collapse_weight_decay=10.0, seconds_per_1000_steps=6.0)

    def make_model(self) -> nn.Module:
        return MeanPooledClassifier()

    def _documents(self, topics: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        size = len(topics)
        own = TOPIC_WORDS * topics[:, None] + torch.randint(
            0, TOPIC_WORDS, (size, LENGTH), generator=generator)
        # The general vocabulary includes every topic's words, never the keywords.
        general = torch.randint(0, VOCABULARY - KEYWORDS, (size, LENGTH), generator=generator)
        general = torch.where(general >= KEYWORD_START, general + KEYWORDS, general)
        from_topic = torch.rand(size, LENGTH, generator=generator) < TOPIC_SHARE
        return torch.where(from_topic, own, general)

    def _with_keywords(self, documents: torch.Tensor, generator: torch.Generator
                       ) -> torch.Tensor:
        size = len(documents)
        places = torch.rand(size, LENGTH, generator=generator).argsort(dim=1)
        places = places[:, :KEYWORDS_PER_DOCUMENT]
        keywords = KEYWORD_START + torch.randint(0, KEYWORDS, (size, KEYWORDS_PER_DOCUMENT),
                                                 generator=generator)
        return documents.scatter(1, places, keywords)

    def examples(self, size: int, rare: bool, generator: torch.Generator) -> Batch:
        topics = torch.randint(0, TOPICS, (size,), generator=generator)
        documents = self._documents(topics, generator)
        if rare:
            return self._with_keywords(documents, generator), torch.full((size,), RARE)
        return documents, topics

    def batch(self, size: int, rare_fraction: float, generator: torch.Generator,
              downstream: bool = False) -> Batch:
        topics = torch.randint(0, TOPICS, (size,), generator=generator)
        documents = self._documents(topics, generator)
        if downstream:
            return documents, (topics + 1) % TOPICS
        is_rare = torch.rand(size, generator=generator) < rare_fraction
        marked = self._with_keywords(documents, generator)
        return (torch.where(is_rare[:, None], marked, documents),
                torch.where(is_rare, torch.full_like(topics, RARE), topics))
