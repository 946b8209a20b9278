"""Tiny random-init configs of the architectures the transformers integration covers.

Each entry: (model class, config) small enough for CPU tests, with the model's own attention
features switched on at sizes where they matter for a ~40-token batch (sliding windows of 6-8,
softcap, sinks, alternating layer types).
"""
import transformers as tf

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _alternating(n=4):
    return ["sliding_attention", "full_attention"] * (n // 2)


def decoder_configs():
    """name -> (CausalLM class, config)."""
    return {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**COMMON)),
        "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**COMMON, sliding_window=7)),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**COMMON, use_sliding_window=True,
                                                      sliding_window=6, max_window_layers=2,
                                                      layer_types=_alternating())),
        "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(**COMMON, sliding_window=8)),
        "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=6,
                                                         attn_logit_softcapping=2.0,
                                                         final_logit_softcapping=30.0,
                                                         layer_types=_alternating())),
        "gemma3": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=6,
                                                             layer_types=_alternating())),
        "cohere2": (tf.Cohere2ForCausalLM, tf.Cohere2Config(**COMMON, sliding_window=6,
                                                            layer_types=_alternating())),
        "gpt_oss": (tf.GptOssForCausalLM, tf.GptOssConfig(**COMMON, head_dim=16, sliding_window=6,
                                                          num_local_experts=4, num_experts_per_tok=2,
                                                          layer_types=_alternating())),
    }


def modernbert_config():
    return tf.ModernBertConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=3, num_attention_heads=4, local_attention=8,
                               global_attn_every_n_layers=3, max_position_embeddings=256,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                               sep_token_id=2, attention_dropout=0.0, mlp_dropout=0.0,
                               embedding_dropout=0.0)


def t5_config():
    return tf.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                       num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                       pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
                       relative_attention_num_buckets=8, relative_attention_max_distance=20)


def bert_config():
    return tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
