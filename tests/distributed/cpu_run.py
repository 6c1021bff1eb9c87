"""TrainingArguments fields the multi-process scripts here share: a short run on CPU that reports, saves and
loads nothing in the background, seeded."""

CPU_RUN = dict(
    per_device_train_batch_size=2,
    use_cpu=True,
    report_to=[],
    save_strategy="no",
    dataloader_num_workers=0,
    seed=0,
)
