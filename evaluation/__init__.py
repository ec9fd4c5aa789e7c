"""Sample, score and compare: what preference tuning did to the images, measured the way the papers measure it.

The on-disk contract of an evaluation folder OUT lives in `evaluation.layout`; `evaluation.sample` fills it with a
model's images (through `evaluation.pipelines`, which the trainer's sampling shares), `evaluation.score` adds
reward-model scores to it and `evaluation.compare` turns two models' scores into paired win rates and an HTML report.
"""
