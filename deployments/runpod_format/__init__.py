"""RunPod worker-vllm's job format: native input to one OpenAI request, the answer to worker-vllm's
output batches."""
