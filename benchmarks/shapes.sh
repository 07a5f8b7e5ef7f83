# Issue 22's benchmark shapes as step_and_sample.py flags, for the GPU scripts to source:
# small (5.36 M parameters, 33-token rows), mid (29.3 M, 88-token rows), paper (the 1.1B recipe).
small="--layers 6 --hidden 256 --heads 8 --kv_heads 4 --ffn 704 --vocab 1024 --latent 8 --in_channels 4 --patch 2 --batch 16 --prompt_len 12 --steps 20 --cfg_scale 4"
mid="--layers 8 --hidden 512 --heads 8 --kv_heads 4 --ffn 1408 --vocab 4096 --latent 16 --in_channels 4 --patch 2 --batch 8 --prompt_len 16 --steps 20 --cfg_scale 4"
paper="--layers 22 --hidden 2048 --heads 32 --kv_heads 4 --ffn 5632 --vocab 32004 --latent 32 --in_channels 4 --patch 2 --batch 32 --prompt_len 16 --steps 20 --cfg_scale 4"
