"""Train a timm ResNet-18 on CIFAR-10 with R2-Loss through the 🤗 Trainer: `python examples/train_trainer.py`.

Every `R2TrainingArguments` field is a flag too (`--r2_loss margin --max_steps 50`), and so are the data's
(`--dataset cifar10`, `--input_size 32` to train at CIFAR's own size instead of the model's 224 pixels,
`--max_train_samples`, ...: `hf_r2.data.DataArguments`).
"""

from transformers import HfArgumentParser

from hf_r2.data import DataArguments, collate_fn, label_names, load_data, record_data_config, with_transforms
from hf_r2.metrics import compute_accuracy
from hf_r2.models import create_model
from hf_r2.trainer import R2Trainer
from hf_r2.training_args import R2TrainingArguments

parser = HfArgumentParser((DataArguments, R2TrainingArguments))
parser.set_defaults(
    dataset_name="cifar10-small",  # 5k / 1k images; "cifar10" for the full set
    output_dir="outputs/resnet18-r2", r2_loss="linf", r2_lambda=0.01, r2_warmup_steps=100, learning_rate=1e-3,
    num_train_epochs=2, per_device_train_batch_size=64, eval_strategy="epoch", save_strategy="epoch",
    save_total_limit=1, logging_steps=20, report_to="none",
)  # fmt: skip
data_args, args = parser.parse_args_into_dataclasses()

dataset = load_data(data_args, seed=args.seed)
model = create_model("resnet18", label_names=label_names(dataset))  # a plain timm model; class names in config.json
record_data_config(model, data_args)  # --input_size: the saved folder is rebuilt, and preprocesses, at that size
size = {"input_size": data_args.input_size, "augment": data_args.augment}
train = with_transforms(dataset["train"], model, train=True, seed=args.seed, **size)  # draws: (seed, epoch, index)
test = with_transforms(dataset["test"], model, train=False, **size)

trainer = R2Trainer(model, args, train_dataset=train, eval_dataset=test, data_collator=collate_fn,
                    compute_metrics=compute_accuracy)  # fmt: skip
trainer.train()
# the evaluation of the last epoch (eval_strategy="epoch") is the final one: evaluate again only if none ran at the end
evals = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
print(evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else trainer.evaluate())
trainer.save_model()  # config.json + model.safetensors (timm layout), r2_config.json, r2_stats.json
