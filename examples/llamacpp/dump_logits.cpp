// llama.cpp's logits for a token sequence, for comparing against this project on the same file.
//
//   dump_logits MODEL TOKENS OUT [n_ubatch] [n_threads] [tokenize]
//
// TOKENS: whitespace-separated ids; the run is one sequence from position 0, float32 K/V cache,
// no flash attention, every token's logits written to OUT as float32 [n_tokens, n_vocab].
// With "tokenize" as the 6th argument TOKENS is UTF-8 text instead and OUT gets its token
// ids (no BOS, specials not parsed), one per line: the tokenizer comparison.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static void quiet(ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL TOKENS OUT [n_ubatch] [n_threads] [tokenize]\n", argv[0]);
        return 2;
    }
    const int n_ubatch = argc > 4 ? atoi(argv[4]) : 512;
    const int n_threads = argc > 5 ? atoi(argv[5]) : 2;
    const bool tokenize = argc > 6 && std::string(argv[6]) == "tokenize";
    llama_log_set(quiet, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.vocab_only = tokenize;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    std::ifstream in(argv[2]);
    std::stringstream ss;
    ss << in.rdbuf();
    if (tokenize) {
        const std::string text = ss.str();
        std::vector<llama_token> ids(text.size() + 16);
        int n = llama_tokenize(vocab, text.data(), (int) text.size(), ids.data(), (int) ids.size(), false, false);
        if (n < 0) { fprintf(stderr, "tokenize failed\n"); return 1; }
        FILE * f = fopen(argv[3], "w");
        for (int i = 0; i < n; i++) fprintf(f, "%d\n", ids[i]);
        fclose(f);
        llama_model_free(model);
        return 0;
    }
    std::vector<llama_token> toks;
    for (long t; ss >> t;) toks.push_back((llama_token) t);
    const int n = (int) toks.size();

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n < 16 ? 16 : n;
    cp.n_batch = n;
    cp.n_ubatch = n_ubatch;
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = n_threads;
    cp.type_k = cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }

    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = toks[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(vocab);
    FILE * f = fopen(argv[3], "wb");
    for (int i = 0; i < n; i++) fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    fclose(f);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
