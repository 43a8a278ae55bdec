"""Watching and judging a run: console progress, metric loggers, curves, eval pages, the run report.

    console   progress bar / plain lines from rank 0's reports; Ray's per-report noise filtered
    loggers   TensorBoard (default), MLflow, W&B, written by the driver from the reports
    curves    curves.png (loss, eval loss, lr, tokens/s against step)
    eval      eval loss over data.eval across all ranks; greedy answers -> eval/step-N.html
    watch     the driver side: Ray Train callback -> progress, loggers, metrics.jsonl, uploads
    report    `omni-ray report RUN`
"""
