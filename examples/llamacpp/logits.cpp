// The prompt logits llama.cpp computes for token ids, float32 [n, n_vocab] to stdout.
// Usage: logits MODEL.gguf N_CTX N_UBATCH id,id,...   (F32KV=1: F32 KV cache, no flash attention)
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
int main(int argc, char ** argv) {
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * m = llama_model_load_from_file(argv[1], mp);
    if (!m) return 1;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = atoi(argv[2]); cp.n_batch = cp.n_ctx; cp.n_ubatch = atoi(argv[3]);
    cp.n_threads = cp.n_threads_batch = 2;
    if (getenv("F32KV")) { cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32; cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED; }
    llama_context * ctx = llama_init_from_model(m, cp);
    std::vector<llama_token> ids;
    for (char * p = strtok(argv[4], ","); p; p = strtok(nullptr, ",")) ids.push_back(atoi(p));
    llama_batch b = llama_batch_init(ids.size(), 0, 1);
    for (size_t i = 0; i < ids.size(); i++) {
        b.token[i] = ids[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = ids.size();
    if (llama_decode(ctx, b)) return 2;
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(m));
    for (size_t i = 0; i < ids.size(); i++) fwrite(llama_get_logits_ith(ctx, i), 4, n_vocab, stdout);
    return 0;
}
