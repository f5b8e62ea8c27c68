"""Train a timm ResNet-18 on CIFAR-10 with R2-Loss through the 🤗 Trainer: `python examples/train_trainer.py`.

Every `R2TrainingArguments` field is a flag too: `python examples/train_trainer.py --r2_loss margin --max_steps 50`.
"""

from transformers import HfArgumentParser

from hf_r2.data import collate_fn, label_names, load_image_dataset, with_transforms
from hf_r2.metrics import compute_accuracy
from hf_r2.models import create_model
from hf_r2.trainer import R2Trainer
from hf_r2.training_args import R2TrainingArguments

parser = HfArgumentParser(R2TrainingArguments)
parser.set_defaults(
    output_dir="outputs/resnet18-r2", r2_loss="linf", r2_weight=0.01, r2_warmup_steps=100, learning_rate=1e-3,
    num_train_epochs=2, per_device_train_batch_size=64, eval_strategy="epoch", save_strategy="epoch",
    save_total_limit=1, logging_steps=20, report_to="none",
)  # fmt: skip
(args,) = parser.parse_args_into_dataclasses()

dataset = load_image_dataset("cifar10-small")  # 5k / 1k images; "cifar10" for the full set
names = label_names(dataset)
model = create_model("resnet18", label_names=names)  # a plain timm model; the class names go into config.json
train = with_transforms(dataset["train"], model, train=True, seed=args.seed)  # augmentation: (seed, epoch, index)
test = with_transforms(dataset["test"], model, train=False)

trainer = R2Trainer(model, args, train_dataset=train, eval_dataset=test, data_collator=collate_fn,
                    compute_metrics=compute_accuracy)  # fmt: skip
trainer.train()
print(trainer.evaluate())
trainer.save_model()  # config.json + model.safetensors (timm layout), r2_config.json, r2_stats.json
