// Greedy tokens from llama.cpp for given prompt token ids: the check that llama.cpp runs our GGUF files as we do.
// llama.cpp's own tools take text and stop at end-of-text; this one takes ids, never stops early, and can write
// every step's logits. Usage: rwkv-greedy MODEL.gguf N_PREDICT N_THREADS LOGITS_OUT|- ID [ID ...]
// Prints the N_PREDICT greedy ids on one line; LOGITS_OUT gets N_PREDICT x n_vocab float32 (the logits each id
// was picked from).
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s MODEL.gguf N_PREDICT N_THREADS LOGITS_OUT|- ID [ID ...]\n", argv[0]);
        return 2;
    }
    const int n_predict = atoi(argv[2]);
    const int n_threads = atoi(argv[3]);
    std::vector<llama_token> prompt;
    for (int i = 5; i < argc; i++) {
        prompt.push_back(atoi(argv[i]));
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params model_params = llama_model_default_params();
    model_params.progress_callback = [](float, void *) { return true; };  // no progress dots on stdout
    // llama.cpp's plain kernels on every CPU, not the weights it repacks for some (its default): the oracle gives the
    // same ids everywhere, and runs where the repacked AMX matmul crashes (see llamacpp.py's AMX_CRASH)
    model_params.use_extra_bufts = false;
    llama_model * model = llama_model_load_from_file(argv[1], model_params);
    if (model == nullptr) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_context_params params = llama_context_default_params();
    params.n_ctx = prompt.size() + n_predict;
    params.n_batch = prompt.size();
    params.n_threads = params.n_threads_batch = n_threads;
    llama_context * ctx = llama_init_from_model(model, params);
    if (ctx == nullptr) {
        fprintf(stderr, "cannot make a context for %s\n", argv[1]);
        return 1;
    }
    FILE * logits_out = argv[4][0] == '-' ? nullptr : fopen(argv[4], "wb");
    llama_batch batch = llama_batch_get_one(prompt.data(), prompt.size());
    llama_token next = 0;
    for (int step = 0; step < n_predict; step++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "llama_decode failed at step %d\n", step);
            return 1;
        }
        const float * logits = llama_get_logits_ith(ctx, -1);
        next = 0;
        for (int v = 1; v < n_vocab; v++) {
            if (logits[v] > logits[next]) {
                next = v;
            }
        }
        if (logits_out != nullptr) {
            fwrite(logits, sizeof(float), n_vocab, logits_out);
        }
        printf("%d%c", next, step + 1 < n_predict ? ' ' : '\n');
        batch = llama_batch_get_one(&next, 1);
    }
    if (logits_out != nullptr) {
        fclose(logits_out);
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
