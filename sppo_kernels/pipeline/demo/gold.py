"""The demo's hidden "gold" preference, the judge built on it, and the small synthetic world it is defined on.

The demo replicates the paper's experiment at CPU size: the gold rule plays GPT-4 (AlpacaEval's judge), a tiny
PairRM trained briefly on gold-labelled pairs plays PairRM (an imperfect proxy of the judge that SPPO optimises
against), and the prompts below play UltraFeedback / AlpacaEval prompts.

The gold rule (:func:`gold_score`) scores one response to one prompt; the higher score wins, equal scores tie:

    gold(prompt, response) = #distinct WARM words in the response
                           − #distinct COLD words in the response
                           + 1  if the response mentions the prompt's topic (the prompt's last word)
                           − 1  if some word occurs 3 or more times in the response (rambling)

Words are the lowercase runs of letters (``[a-z]+``). It rewards a friendly tone and relevance and punishes a
dismissive tone and repetition; it is not a length rule (a longer response wins only through what it says),
although warm closing sentences make the preferred responses somewhat longer, as judges' favourites are.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

WARM_WORDS = frozenset({"sure", "glad", "happy", "hope", "thanks"})
COLD_WORDS = frozenset({"meh", "whatever", "ugh", "dunno"})
REPEAT_LIMIT = 3

# --------------------------------------------------------------------------------------------- the rule


def words(text: str) -> list[str]:
    """The lowercase letter runs of ``text``."""
    return re.findall(r"[a-z]+", text.lower())


def topic(prompt: str) -> str | None:
    """The prompt's topic: its last word (every demo prompt ends with its topic)."""
    found = words(prompt)
    return found[-1] if found else None


def gold_score(prompt: str, response: str) -> int:
    """The hidden gold score of ``response`` to ``prompt`` (see the module docstring)."""
    found = words(response)
    present = set(found)
    score = len(present & WARM_WORDS) - len(present & COLD_WORDS)
    subject = topic(prompt)
    if subject is not None and subject in present:
        score += 1
    if found and max(Counter(found).values()) >= REPEAT_LIMIT:
        score -= 1
    return score


class GoldJudge:
    """The gold rule as a pairwise judge (:class:`sppo_kernels.pipeline.models.judge.PairwiseScorer`).

    ``compare`` returns ``L_ij = gold_i − gold_j``: a logit that is positive when i beats j, 0 on ties.
    """

    name = "gold"

    def compare(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
        """Logits [n, K, K] (float32) that candidate i beats candidate j."""
        scores = np.array([[gold_score(p, c) for c in cands] for p, cands in zip(prompts, candidates, strict=True)])
        return (scores[:, :, None] - scores[:, None, :]).astype(np.float32)


# --------------------------------------------------------------------------------------------- the world

TOPICS = (
    "cats", "dogs", "rain", "coffee", "tea", "music", "books", "trains", "bread", "stars", "rivers", "gardens",
    "bikes", "clouds", "apples", "oceans", "forests", "maps", "clocks", "candles", "kites", "robots", "poems",
    "bridges", "islands", "deserts", "owls", "bees", "chess", "soup", "snow", "storms", "planets", "markets",
    "castles", "violins", "puzzles", "lamps", "boats", "mountains", "lakes", "wolves", "tigers", "cookies",
    "pianos", "rockets", "shells", "tulips",
)  # fmt: skip
TEMPLATES = (
    "Tell me about {t}.", "What do you think of {t}?", "Describe {t}.", "Share a fact about {t}.",
    "Why do people like {t}?", "Say something about {t}.", "Write one line on {t}.", "Give me a tip about {t}.",
    "Explain {t}.", "What is special about {t}?", "Talk to me about {t}.", "Any thoughts on {t}?",
    "I want to hear about {t}.", "Teach me about {t}.", "Please comment on {t}.", "Could you discuss {t}?",
)  # fmt: skip
WARM_OPENERS = ("Sure!", "Glad to help!", "Happy to!")
NEUTRAL_OPENERS = ("Well,", "OK,", "So,")
COLD_OPENERS = ("Meh.", "Whatever.", "Ugh.")
WARM_CLOSERS = ("Hope this helps!", "Thanks for asking!")
COLD_CLOSERS = ("Dunno.", "Whatever.")
ADJECTIVES = ("nice", "great", "fine", "odd", "common", "old", "new", "small", "big", "calm")
SECOND_SENTENCES = ("I like {t}.", "{T} can be {a}.", "Many people know {t}.", "Some {t} are {a}.")


def world_prompts() -> list[str]:
    """Every demo prompt (``len(TOPICS) × len(TEMPLATES)`` = 768), in a fixed order; each ends with its topic."""
    return [template.format(t=t) for t in TOPICS for template in TEMPLATES]


def base_response(rng: np.random.Generator, prompt: str) -> str:
    """One response of the base behaviour the demo policy is warm-started on: an opener (warm, neutral or cold,
    0.3/0.4/0.3), a sentence about the prompt's topic (half the time about another topic), an optional second
    sentence (0.5) and an optional closer (warm 0.3, none 0.4, cold 0.3). Every gold feature but rambling varies,
    so K samples usually differ in gold score; rambling is what a degenerating policy does (loops)."""
    subject = topic(prompt) or "things"
    if rng.random() < 0.5:
        subject = str(rng.choice([t for t in TOPICS if t != subject]))
    opener = str(rng.choice(rng.choice([WARM_OPENERS, NEUTRAL_OPENERS, COLD_OPENERS], p=[0.3, 0.4, 0.3])))
    parts = [opener, f"{subject.capitalize()} are {rng.choice(ADJECTIVES)}."]
    if rng.random() < 0.5:
        second = str(rng.choice(SECOND_SENTENCES))
        parts.append(second.format(t=subject, T=subject.capitalize(), a=str(rng.choice(ADJECTIVES))))
    closer = rng.choice(3, p=[0.3, 0.4, 0.3])
    if closer == 0:
        parts.append(str(rng.choice(WARM_CLOSERS)))
    elif closer == 2:
        parts.append(str(rng.choice(COLD_CLOSERS)))
    return " ".join(parts)
