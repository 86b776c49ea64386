"""Real benchmarks read from local copies in their published layouts: ChartQA, DocVQA, MMBench, TextVQA, ScienceQA.

  BENCHMARKS[name]   builder class, metric, InternVL-2 eval settings, split map and fixture writer (common.Benchmark)
  prepare(kind, manual_dir, data_dir)  build once (keyed by manual_dir and the annotation files) -> TFDS builder;
                                       builder.as_data_source(published_split) gives the stored records
  to_record(raw, prompt_suffix)        a stored record -> a drex.data.record, prompted as InternVL's eval scripts
One module per benchmark (chartqa, docvqa, mmbench, textvqa, scienceqa: builder + fixture writer); common holds
the stored features, the builder base, prepare, to_record and the registry.
"""

from drex.data.benchmarks import common
from drex.data.benchmarks import chartqa, docvqa, mmbench, scienceqa, textvqa
from drex.data.benchmarks.common import (BENCHMARKS, MC_SUFFIX, VQA_SUFFIX, Benchmark, dataset_key, prepare, register,
                                         to_record)

register(Benchmark("chartqa", chartqa.ChartQA, "relaxed_accuracy", VQA_SUFFIX, 100, 13,
                   {"train": "train", "validation": "val", "test": "test"}, chartqa.write_fixture,
                   subsets=chartqa.SUBSETS))
register(Benchmark("docvqa", docvqa.DocVQA, "anls", VQA_SUFFIX, 100, 19,
                   {"train": "train", "validation": "val", "test": "val"}, docvqa.write_fixture))  # test: no answers
register(Benchmark("mmbench", mmbench.MMBench, "circular_mc", MC_SUFFIX, 100, 7,
                   {"validation": "dev", "test": "dev"}, mmbench.write_fixture))  # no train split
register(Benchmark("textvqa", textvqa.TextVQA, "vqa_accuracy", VQA_SUFFIX, 10, 7,
                   {"train": "train", "validation": "val", "test": "val"}, textvqa.write_fixture))  # test: no answers
register(Benchmark("scienceqa", scienceqa.ScienceQA, "mc_accuracy", MC_SUFFIX, 100, 7,
                   {"train": "train", "validation": "val", "test": "test"}, scienceqa.write_fixture))

__all__ = ["BENCHMARKS", "Benchmark", "common", "dataset_key", "prepare", "to_record"]
