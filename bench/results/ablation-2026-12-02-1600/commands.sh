# the base's pre-training corpus
cocoa-data scenes --out runs/ablation/scenes-pretrain --train 4000 --eval-per-task 0 --distractors 49 --seed 7 --image-size 112 --datasets SceneCls
# the fixed training pairs
cocoa-data scenes --out runs/ablation/scenes-train --train 1000 --eval-per-task 0 --distractors 49 --seed 0 --image-size 112 --datasets SceneCls
# validation: IND sets only
cocoa-data scenes --out runs/ablation/scenes-val --train 0 --eval-per-task 100 --distractors 49 --seed 101 --image-size 112 --datasets SceneCls,SceneVQA,SceneT2I,SceneI2T,SceneGround
# test: IND and OOD sets
cocoa-data scenes --out runs/ablation/scenes-test --train 0 --eval-per-task 200 --distractors 49 --seed 202 --image-size 112
# teacher captions + QA for every training image
cocoa-data synth --source scenes --scenes-dir runs/ablation/scenes-train --out runs/ablation/data --no-progress
# filter, dedupe, decontaminate against the test sets
cocoa-data curate --data runs/ablation/data --eval-data runs/ablation/scenes-test/eval --no-progress
# original:synthetic 1:1 (stages 1-2)
cocoa-data mix --ratio 1:1 --data runs/ablation/data --no-progress
# stages 1,2 of pre-full-12-seed0
cocoa-train --stages 1,2 --data runs/ablation/data --model runs/ablation/base --preset tiny --out runs/ablation/runs/pre-full-12-seed0/train --seed 0 --no-progress --log-every 10 --resume auto --lora-method full --stage1-steps 200 --stage1-batch-size 16 --stage1-micro-batch-size 16 --stage1-lr 0.0001 --stage1-schedule constant --stage1-warmup-ratio 0.05 --stage1-save-every 100 --stage2-steps 200 --stage2-batch-size 16 --stage2-micro-batch-size 16 --stage2-lr 0.0003 --stage2-schedule constant --stage2-warmup-ratio 0.05 --stage2-save-every 100 --stage1-image-mask-ratio 0.3 --stage1-text-mask-ratio 0.2 --stage2-mask-variant paper --stage2-b-mask-ratio 0.7
# stages 1,2 of pre-full-strict-12-seed0
cocoa-train --stages 1,2 --data runs/ablation/data --model runs/ablation/base --preset tiny --out runs/ablation/runs/pre-full-strict-12-seed0/train --seed 0 --no-progress --log-every 10 --resume auto --lora-method full --stage1-steps 200 --stage1-batch-size 16 --stage1-micro-batch-size 16 --stage1-lr 0.0001 --stage1-schedule constant --stage1-warmup-ratio 0.05 --stage1-save-every 100 --stage2-steps 200 --stage2-batch-size 16 --stage2-micro-batch-size 16 --stage2-lr 0.0003 --stage2-schedule constant --stage2-warmup-ratio 0.05 --stage2-save-every 100 --stage1-image-mask-ratio 0.3 --stage1-text-mask-ratio 0.2 --stage2-mask-variant strict --stage2-b-mask-ratio 0.7
# stages 1,2 of pre-dora-12-seed0
cocoa-train --stages 1,2 --data runs/ablation/data --model runs/ablation/base --preset tiny --out runs/ablation/runs/pre-dora-12-seed0/train --seed 0 --no-progress --log-every 10 --resume auto --lora-method dora --lora-r 8 --lora-alpha 64 --lora-train-vision --stage1-steps 200 --stage1-batch-size 16 --stage1-micro-batch-size 16 --stage1-lr 0.0003 --stage1-schedule constant --stage1-warmup-ratio 0.05 --stage1-save-every 100 --stage2-steps 200 --stage2-batch-size 16 --stage2-micro-batch-size 16 --stage2-lr 0.001 --stage2-schedule constant --stage2-warmup-ratio 0.05 --stage2-save-every 100 --stage1-image-mask-ratio 0.3 --stage1-text-mask-ratio 0.2 --stage2-mask-variant paper --stage2-b-mask-ratio 0.7
# stage 3 of s3-lr0.0001-seed0
cocoa-train --stages 3 --data runs/ablation/data --model runs/ablation/base --preset tiny --out runs/ablation/runs/s3-lr0.0001-seed0/train --seed 0 --no-progress --log-every 10 --resume auto --lora-method full --keep-checkpoints 100000 --stage3-steps 1600 --stage3-batch-size 32 --stage3-micro-batch-size 32 --no-stage3-grad-cache --stage3-lr 0.0001 --stage3-schedule constant --stage3-warmup-ratio 0.00625 --stage3-save-every 100
# stage 3 of s3-lr0.0003-seed0
cocoa-train --stages 3 --data runs/ablation/data --model runs/ablation/base --preset tiny --out runs/ablation/runs/s3-lr0.0003-seed0/train --seed 0 --no-progress --log-every 10 --resume auto --lora-method full --keep-checkpoints 100000 --stage3-steps 1600 --stage3-batch-size 32 --stage3-micro-batch-size 32 --no-stage3-grad-cache --stage3-lr 0.0003 --stage3-schedule constant --stage3-warmup-ratio 0.00625 --stage3-save-every 100
# stage 3 of s3-lr0.001-seed0
cocoa-train --stages 3 --data runs/ablation/data --model runs/ablation/base --preset tiny --out runs/ablation/runs/s3-lr0.001-seed0/train --seed 0 --no-progress --log-every 10 --resume auto --lora-method full --keep-checkpoints 100000 --stage3-steps 1600 --stage3-batch-size 32 --stage3-micro-batch-size 32 --no-stage3-grad-cache --stage3-lr 0.001 --stage3-schedule constant --stage3-warmup-ratio 0.00625 --stage3-save-every 100
# stage 3 of s123-full-lr0.0003-seed0
cocoa-train --stages 3 --data runs/ablation/data --model runs/ablation/runs/pre-full-12-seed0/train/stage2/model --preset tiny --out runs/ablation/runs/s123-full-lr0.0003-seed0/train --seed 0 --no-progress --log-every 10 --resume auto --lora-method full --keep-checkpoints 100000 --stage3-steps 1600 --stage3-batch-size 32 --stage3-micro-batch-size 32 --no-stage3-grad-cache --stage3-lr 0.0003 --stage3-schedule constant --stage3-warmup-ratio 0.00625 --stage3-save-every 100
# stage 3 of s123-full-strict-lr0.0003-seed0
cocoa-train --stages 3 --data runs/ablation/data --model runs/ablation/runs/pre-full-strict-12-seed0/train/stage2/model --preset tiny --out runs/ablation/runs/s123-full-strict-lr0.0003-seed0/train --seed 0 --no-progress --log-every 10 --resume auto --lora-method full --keep-checkpoints 100000 --stage3-steps 1600 --stage3-batch-size 32 --stage3-micro-batch-size 32 --no-stage3-grad-cache --stage3-lr 0.0003 --stage3-schedule constant --stage3-warmup-ratio 0.00625 --stage3-save-every 100
# stage 3 of s123-dora-lr0.0003-seed0
cocoa-train --stages 3 --data runs/ablation/data --model runs/ablation/runs/pre-dora-12-seed0/train/stage2/model --preset tiny --out runs/ablation/runs/s123-dora-lr0.0003-seed0/train --seed 0 --no-progress --log-every 10 --resume auto --lora-method full --keep-checkpoints 100000 --stage3-steps 1600 --stage3-batch-size 32 --stage3-micro-batch-size 32 --no-stage3-grad-cache --stage3-lr 0.0003 --stage3-schedule constant --stage3-warmup-ratio 0.00625 --stage3-save-every 100
