"""synthetic_cxr_vqa: templated questions about synthetic_cxr's radiographs, the default VQA set.

The studies and images are synthetic_cxr's (data/synthetic_cxr.py), the same configs with
the same seeds and sizes: study `index` of split s is `sample_study(seed, s, index)` and its
image `render(study, image_size)`, so the PNG of every record here is byte-identical to
synthetic_cxr's record of that study (image_id = patient = the study's name, e.g.
'synthetic_cxr-train-00007', as synthetic_cxr's study and patient). Records follow the
'cxr_vqa' layout (data/vqa.py), one per question, ids '<study>/q<j>'. Which questions a
study is asked is drawn from `np.random.default_rng([seed, s, index, 3])` (a stream
synthetic_cxr does not use); the answers are read from the study's findings (the
generator's ground truth), never from the pixels. 'right' and 'left' are the patient's
(synthetic_cxr.ORIENTATION: the patient's right is on the image's LEFT), so no augmentation
may mirror the images.

Closed questions (answer 'yes' / 'no'; question_type 'presence', devices 'device'), two
paraphrases each, about one fact of CLOSED_FACTS (16):
  opacity in a cell       'is there an opacity in the right lower zone?' / 'is there
                          consolidation in the right lower lobe?' (6 cells; the left middle
                          one is 'left mid zone' / 'lingula')
  effusion per side       'is there a left pleural effusion?' / 'is there fluid in the left
                          pleural space?'
  pneumothorax per side   'is there a pneumothorax on the right?' / 'is there a right
                          pneumothorax?'
  cardiomegaly            'is the heart enlarged?' / 'is there cardiomegaly?'
  devices                 'is there an endotracheal tube?', 'is there a central venous
                          catheter?' (and paraphrases)
  normal statements       'are the lungs clear?' (no opacity), 'is the heart size normal?',
                          'are the costophrenic angles sharp?' (no effusion)
Open questions (question_type 'location', 'size', 'device'), OPEN_TEMPLATES (8):
  'where is the opacity?' / 'which lobe shows an opacity?'  -> 'none', a lobe ('right upper
      lobe', 'right middle lobe', 'right lower lobe', 'left upper lobe', 'lingula', 'left
      lower lobe'), 'both upper lobes', 'both lower lobes', or two lobes ('right upper lobe
      and left lower lobe', 'right middle lobe and lingula'): upper zones first, right first
  'which side is the effusion on?'        -> 'right', 'left', 'both', 'none'
  'which side is the pneumothorax on?'    -> 'right', 'left', 'none'
  'what support device is present?'       -> 'endotracheal tube', 'central venous
      catheter', 'both', 'none'
  'how large is the heart?'               -> 'normal', 'mildly enlarged', 'moderately
      enlarged' (synthetic_cxr's cardiothoracic ratio below / above 0.58)
  'how large is the right (left) pleural effusion?', 'how large is the pneumothorax?'
                                          -> 'small', 'moderate' (asked only when present)

Balance by choosing what to ask. Each fact (template) is asked of a study independently,
with probability rate * min(p, 1 - p) / P(its answer), p the share of studies for which it
is 'yes' (for a template: not 'none' / 'normal'), measured on 20,000 generated studies
(`ClosedFact.prevalence`, `OpenTemplate.informative`). Then P(asked and yes) = P(asked and
no) for every fact, so a question's text says nothing about its answer, and the closed
answers are half 'yes' over a split; likewise every open template answers 'none' / 'normal'
about half the time instead of 70-93%. Rare facts are asked less often (a pneumothorax side
~7% as often as 'are the lungs clear?'). CLOSED_RATE (0.65) gives 2.0 closed questions per
study on average; OPEN_RATE = 1 (the most the balance allows) 1.9 open ones; the size
questions are asked whenever they apply. A study gets 0 to 12 questions (3.9 on average);
3.5% get none, so their image is in no record.

Measured on the default config (seed 0, built by the builder: `python -m tests.test_vqa`):
  records         11,692 / 1,606 / 1,647 (train / validation / test), from 2,895 / 390 /
                  385 of the 3,000 / 400 / 400 studies; closed share 0.52 / 0.52 / 0.50
  closed 'yes'    0.503 / 0.491 / 0.505 of the closed questions (seeds 0-4: 0.499, sd 0.003)
  answers         34 distinct in train (2 closed, 32 open: 'none' is shared by four
                  templates; 21 opacity locations), none of test's outside them
  question texts  45 (32 closed, 13 open), 3 to 9 words
  question-only baseline (the majority training answer of each question text: an
  independent numpy probe, tests/test_vqa.py `question_only_baseline`), test accuracy:
                  seed 0: closed 0.478, open 0.508, all 0.493
                  seeds 0-4 (in memory, the same questions): closed 0.498 (sd 0.016, max
                  0.520), open 0.505 (sd 0.010, max 0.515), all 0.502 (sd 0.005)
So a model must beat ~0.50 on closed and ~0.51 on open questions before it shows that it
reads the image.

Configs: 'default' (128 x 128 PNG, 3,000 / 400 / 400 studies, seed 0) and 'tiny' (64 x 64,
64 / 16 / 16), as synthetic_cxr's; overrides (image_size, num_studies, seed) make a config
named as synthetic_cxr's would be ('s96_n3000_400_400_seed3'), with the same studies.
Metadata: as `vqa.VqaBuilder` (tokenizer of the training questions, answers, summary), plus
image_size, seed, orientation, label_names (synthetic_cxr's) and the design (facts,
templates and their prevalences, the rates, synthetic_cxr's Design). Building the default
config takes ~30 s of CPU (each study rendered once for all its questions).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from medguide_jax.data import images
from medguide_jax.data import synthetic_cxr as sc
from medguide_jax.data import vqa

SPLITS = sc.SPLITS
QUESTION_STREAM = 3          # rng [seed, split, index, 3]: synthetic_cxr uses 0, 1 and 2
NEGATIVE = ("none", "normal")
CLOSED_PER_STUDY = 2.0       # closed questions per study, on average (sets CLOSED_RATE)
OPEN_RATE = 1.0              # the open questions' rate (~1.9 per study: the most balance allows)

_ZONE_WORD = {"upper": "upper", "middle": "mid", "lower": "lower"}
LOBE = {("right", "upper"): "right upper lobe", ("right", "middle"): "right middle lobe",
        ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
        ("left", "middle"): "lingula", ("left", "lower"): "left lower lobe"}
_BOTH = {"upper": "both upper lobes", "middle": "right middle lobe and lingula",
         "lower": "both lower lobes"}
_HEART = {"mild": "mildly enlarged", "moderate": "moderately enlarged"}


# --------------------------------------------------------------------------- facts
def study_facts(study: sc.Study) -> frozenset[str]:
  """The keys of CLOSED_FACTS that are true of `study`."""
  kinds = {f.kind for f in study.findings}
  facts = set(study.labels - {"support_devices"})
  facts |= kinds & {"endotracheal_tube", "central_line"}
  if "opacity" not in kinds:
    facts.add("lungs_clear")
  if "cardiomegaly" not in kinds:
    facts.add("heart_normal")
  if "effusion" not in kinds:
    facts.add("angles_sharp")
  return frozenset(facts)


@dataclasses.dataclass(frozen=True)
class ClosedFact:
  """A yes/no fact: its key (study_facts), question type, paraphrases and prevalence
  P(yes) over generated studies (20,000 of seed 0; used only to balance the answers)."""
  key: str
  question_type: str
  questions: tuple[str, ...]
  prevalence: float


_OPACITY_PREVALENCE = {("right", "upper"): 0.058, ("right", "middle"): 0.050,
                       ("right", "lower"): 0.085, ("left", "upper"): 0.056,
                       ("left", "middle"): 0.050, ("left", "lower"): 0.081}
CLOSED_FACTS = tuple(
    [ClosedFact(sc.opacity_label(s, z), "presence",
                (f"is there an opacity in the {s} {_ZONE_WORD[z]} zone?",
                 f"is there consolidation in the {LOBE[(s, z)]}?"), _OPACITY_PREVALENCE[(s, z)])
     for s in sc.SIDES for z in sc.ZONES]
    + [ClosedFact(f"effusion_{s}", "presence", (f"is there a {s} pleural effusion?",
                                                 f"is there fluid in the {s} pleural space?"),
                  p) for s, p in zip(sc.SIDES, (0.089, 0.081))]
    + [ClosedFact(f"pneumothorax_{s}", "presence", (f"is there a pneumothorax on the {s}?",
                                                     f"is there a {s} pneumothorax?"), p)
       for s, p in zip(sc.SIDES, (0.035, 0.033))]
    + [ClosedFact("cardiomegaly", "presence", ("is the heart enlarged?",
                                               "is there cardiomegaly?"), 0.147),
       ClosedFact("endotracheal_tube", "device", ("is there an endotracheal tube?",
                                                  "is an endotracheal tube present?"), 0.071),
       ClosedFact("central_line", "device", ("is there a central venous catheter?",
                                             "is a central line present?"), 0.117),
       ClosedFact("lungs_clear", "presence", ("are the lungs clear?",
                                              "are the lungs free of opacities?"), 0.698),
       ClosedFact("heart_normal", "presence", ("is the heart size normal?",
                                               "is the heart of normal size?"), 0.853),
       ClosedFact("angles_sharp", "presence", ("are the costophrenic angles sharp?",
                                               "are both costophrenic angles clear?"), 0.864)])
# A fact is asked with probability CLOSED_RATE * min(p, 1 - p) / P(its answer): on average
# sum_f 2 * CLOSED_RATE * min(p_f, 1 - p_f) = CLOSED_PER_STUDY closed questions per study.
CLOSED_RATE = CLOSED_PER_STUDY / sum(2 * min(f.prevalence, 1 - f.prevalence)
                                     for f in CLOSED_FACTS)


# --------------------------------------------------------------------------- open answers
def _by_kind(study: sc.Study, kind: str) -> list[sc.Finding]:
  return [f for f in study.findings if f.kind == kind]


def opacity_location(study: sc.Study) -> str:
  """'none', a lobe, 'both <zone> lobes' or '<lobe> and <lobe>' (upper zones first)."""
  ops = sorted(_by_kind(study, "opacity"),
               key=lambda f: (sc.ZONES.index(f.zone), sc.SIDES.index(f.side)))
  cells = [(f.side, f.zone) for f in ops]
  if not cells:
    return "none"
  if len(cells) == 2 and cells[0][1] == cells[1][1]:
    return _BOTH[cells[0][1]]
  return " and ".join(LOBE[c] for c in cells)


def _side_answer(findings: Sequence[sc.Finding]) -> str:
  sides = {f.side for f in findings}
  return "both" if len(sides) == 2 else (next(iter(sides)) if sides else "none")


def _device_answer(study: sc.Study) -> str:
  tube, line = bool(_by_kind(study, "endotracheal_tube")), bool(_by_kind(study, "central_line"))
  if tube and line:
    return "both"
  return "endotracheal tube" if tube else "central venous catheter" if line else "none"


def _heart_answer(study: sc.Study) -> str:
  heart = _by_kind(study, "cardiomegaly")
  return _HEART[heart[0].size] if heart else "normal"


def _size_of(kind: str, side: str | None = None) -> Callable[[sc.Study], str | None]:
  def answer(study: sc.Study) -> str | None:
    found = [f for f in _by_kind(study, kind) if side is None or f.side == side]
    return found[0].size if found else None
  return answer


@dataclasses.dataclass(frozen=True)
class OpenTemplate:
  """An open question: key, question type, paraphrases, the answer of a study (None: not
  asked of it) and `informative`, the share of its answers that are not NEGATIVE (20,000
  studies of seed 0; 1.0 for the size questions, asked only when the finding is there)."""
  key: str
  question_type: str
  questions: tuple[str, ...]
  answer: Callable[[sc.Study], str | None]
  informative: float


OPEN_TEMPLATES = (
    OpenTemplate("opacity_location", "location",
                 ("where is the opacity?", "which lobe shows an opacity?"), opacity_location,
                 0.302),
    OpenTemplate("effusion_side", "location",
                 ("which side is the effusion on?", "on which side is there a pleural "
                  "effusion?"), lambda st: _side_answer(_by_kind(st, "effusion")), 0.136),
    OpenTemplate("pneumothorax_side", "location",
                 ("which side is the pneumothorax on?", "where is the pneumothorax?"),
                 lambda st: _side_answer(_by_kind(st, "pneumothorax")), 0.068),
    OpenTemplate("device", "device",
                 ("what support device is present?", "which lines or tubes are present?"),
                 _device_answer, 0.180),
    OpenTemplate("heart_size", "size", ("how large is the heart?", "what is the heart size?"),
                 _heart_answer, 0.147),
    OpenTemplate("effusion_size_right", "size",
                 ("how large is the right pleural effusion?",),
                 _size_of("effusion", "right"), 1.0),
    OpenTemplate("effusion_size_left", "size",
                 ("how large is the left pleural effusion?",), _size_of("effusion", "left"), 1.0),
    OpenTemplate("pneumothorax_size", "size", ("how large is the pneumothorax?",),
                 _size_of("pneumothorax"), 1.0),
)


# --------------------------------------------------------------------------- questions
@dataclasses.dataclass(frozen=True)
class Question:
  """One generated question: its text, normalised answer, 'closed'/'open', question type
  and the fact / template key it was made from."""
  question: str
  answer: str
  answer_type: str
  question_type: str
  template: str


def _pick(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def _kept(rng: np.random.Generator, rate: float, share: float, positive: bool) -> bool:
  """Whether a question whose answer is positive (yes / informative) with prevalence
  `share` is asked: with probability rate * min(share, 1 - share) / P(this answer), so that
  P(asked and positive) = P(asked and not positive) = rate * min(share, 1 - share)."""
  p_answer = share if positive else 1.0 - share
  return bool(rng.uniform() < rate * min(share, 1.0 - share) / p_answer)


def _closed_questions(rng: np.random.Generator, study: sc.Study) -> list[Question]:
  facts = study_facts(study)
  out = []
  for fact in CLOSED_FACTS:
    truth = fact.key in facts
    if _kept(rng, CLOSED_RATE, fact.prevalence, truth):
      out.append(Question(_pick(rng, fact.questions), "yes" if truth else "no", vqa.CLOSED,
                          fact.question_type, fact.key))
  return out


def _open_questions(rng: np.random.Generator, study: sc.Study) -> list[Question]:
  out = []
  for template in OPEN_TEMPLATES:
    answer = template.answer(study)
    if answer is None:
      continue
    if template.informative >= 1.0:   # a size question: asked whenever it applies
      keep = bool(rng.uniform() < OPEN_RATE)
    else:
      keep = _kept(rng, OPEN_RATE, template.informative, answer not in NEGATIVE)
    if keep:
      out.append(Question(_pick(rng, template.questions), answer, vqa.OPEN,
                          template.question_type, template.key))
  return out


def study_questions(study: sc.Study, rng: np.random.Generator) -> list[Question]:
  """The study's closed questions, then its open ones (in CLOSED_FACTS / OPEN_TEMPLATES
  order), each fact or template asked at most once, each independently (module docstring):
  0 to a handful per study."""
  return _closed_questions(rng, study) + _open_questions(rng, study)


def questions_of(seed: int, split_id: int, index: int,
                 study: sc.Study | None = None) -> tuple[sc.Study, list[Question]]:
  """(study, questions) of study `index` of split `split_id` (no pixels): the builder's."""
  study = study or sc.sample_study(seed, split_id, index)
  rng = np.random.default_rng([seed, split_id, index, QUESTION_STREAM])
  return study, study_questions(study, rng)


def question_fields(study: sc.Study, questions: Sequence[Question]) -> list[dict]:
  """The records of a study without their image (b''), in order."""
  return [vqa.record(image=b"", question=q.question, answer=q.answer,
                     answer_type=q.answer_type, question_type=q.question_type,
                     image_id=study.name, patient=study.name, id=f"{study.name}/q{j}")
          for j, q in enumerate(questions)]


def study_records(study: sc.Study, questions: Sequence[Question], image_size: int
                  ) -> list[tuple[str, dict]]:
  """(key, 'cxr_vqa' record) of each question, with the study's image exactly as
  synthetic_cxr stores it (rendered once)."""
  image = images.encode_png(sc.render(study, image_size)[0])
  return [(r["id"], {**r, "image": image}) for r in question_fields(study, questions)]


# --------------------------------------------------------------------------- the builder
@dataclasses.dataclass(eq=False)
class SyntheticCxrVqaConfig(tfds.core.BuilderConfig):
  """synthetic_cxr's settings: image side in pixels, studies per split, seed."""
  image_size: int = 128
  num_studies: tuple[int, int, int] = (3000, 400, 400)
  seed: int = 0


def custom_config(image_size: int, num_studies, seed: int) -> SyntheticCxrVqaConfig:
  """A config named (and checked) as synthetic_cxr.custom_config names its own."""
  base = sc.custom_config(image_size, num_studies, seed)
  return SyntheticCxrVqaConfig(name=base.name, image_size=base.image_size,
                               num_studies=base.num_studies, seed=base.seed,
                               description=base.description)


class SyntheticCxrVqa(vqa.VqaBuilder):
  """Templated questions about synthetic_cxr's studies, answered from their findings (see
  the module docstring)."""

  name = "synthetic_cxr_vqa"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticCxrVqaConfig(name="default", description="synthetic_cxr's default studies "
                            "(128x128 PNG, 3000/400/400, seed 0), 4 questions each."),
      SyntheticCxrVqaConfig(name="tiny", image_size=64, num_studies=(64, 16, 16),
                            description="synthetic_cxr:tiny's studies (64x64 PNG, 64/16/16, "
                                        "seed 0), 4 questions each."),
  ]

  def __init__(self, *, tag: str | None = None, image_size: int | None = None,
               num_studies: tuple[int, int, int] | None = None, seed: int | None = None,
               **kwargs):
    """Usual TFDS kwargs, plus a tag ('tiny'; 'synthetic_cxr_vqa:tiny') or overrides
    (image_size, num_studies per split, seed) of the tag's config, as synthetic_cxr's."""
    configs = {c.name: c for c in self.BUILDER_CONFIGS}
    if tag is not None and tag not in configs:
      raise ValueError(f"synthetic_cxr_vqa tag {tag!r} is unknown; valid tags: {list(configs)}")
    if tag is not None:
      kwargs["config"] = tag
    if image_size is not None or num_studies is not None or seed is not None:
      base = configs[tag or "default"]
      kwargs["config"] = custom_config(
          base.image_size if image_size is None else image_size,
          base.num_studies if num_studies is None else num_studies,
          base.seed if seed is None else seed)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    info.metadata.update(image_size=self.builder_config.image_size,
                         seed=self.builder_config.seed, label_names=list(sc.LABEL_NAMES),
                         orientation=sc.ORIENTATION)
    return info

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    made = {split: [questions_of(config.seed, split_id, i)
                    for i in range(config.num_studies[split_id])]
            for split_id, split in enumerate(SPLITS)}
    fields = {split: [r for st, qs in v for r in question_fields(st, qs)]
              for split, v in made.items()}
    train = fields[SPLITS[0]]
    vocabulary = vqa.answer_vocabulary(r["answer"] for r in train)
    self.set_metadata(
        train_questions=[r["question"] for r in train],
        train_answers=[r["answer"] for r in train],
        summary={"splits": vqa.summarise(fields, vocabulary),
                 "studies": dict(zip(SPLITS, map(int, config.num_studies)))},
        image_size=config.image_size, seed=config.seed, label_names=list(sc.LABEL_NAMES),
        orientation=sc.ORIENTATION, design=design())
    return {split: self._generate_examples(v) for split, v in made.items() if v}

  def _generate_examples(self, made: Sequence[tuple[sc.Study, list[Question]]]
                         ) -> Iterator[tuple[str, dict]]:
    for study, questions in made:
      yield from study_records(study, questions, self.builder_config.image_size)


def design() -> dict:
  """The question design as metadata: the rates, the facts and templates with their
  prevalences, the question stream, and synthetic_cxr's Design."""
  return {"closed_rate": CLOSED_RATE, "open_rate": OPEN_RATE,
          "question_stream": f"np.random.default_rng([seed, split, index, {QUESTION_STREAM}])",
          "closed_facts": {f.key: {"question_type": f.question_type,
                                   "questions": list(f.questions), "prevalence": f.prevalence}
                           for f in CLOSED_FACTS},
          "open_templates": {t.key: {"question_type": t.question_type,
                                     "questions": list(t.questions),
                                     "informative": t.informative}
                             for t in OPEN_TEMPLATES},
          "balancing": "each fact / template asked independently with probability "
                       "rate * min(p, 1 - p) / P(its answer) (size questions: rate, when "
                       "they apply)",
          "synthetic_cxr_design": dataclasses.asdict(sc.DESIGN)}


def split_questions(config: Mapping | SyntheticCxrVqaConfig, split: str) -> list[dict]:
  """The records (without images) of one split of a config, generated in memory."""
  get = (lambda k: config[k]) if isinstance(config, Mapping) else (
      lambda k: getattr(config, k))
  split_id = SPLITS.index(split)
  return [r for i in range(int(get("num_studies")[split_id]))
          for r in question_fields(*questions_of(int(get("seed")), split_id, i))]
