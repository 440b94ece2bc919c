/*
 * caption: caption image files with a duet bundle through the C ABI (libduet.so + duet.h).
 *
 *   cc -std=c11 -Wall -Wextra -I ffi/include examples/c/caption.c -L target/release -lduet -o caption
 *   ./caption [--provider auto|tensorrt|cuda|ort-cpu|tract] [--strict] [--ort-lib PATH]
 *             [--beam N | --temperature T [--top-k K] [--top-p P] [--seed S]] [--max-tokens N]
 *             [--prompt TEXT] [--stream] BUNDLE IMAGE...
 *
 * Prints "PATH<TAB>CAPTION" per image on stdout and the provider report on stderr. --ort-lib
 * names the libonnxruntime to load (as an application should; without it duet looks at
 * ORT_DYLIB_PATH, then .ort/lib/). The decoding options fill a DuetDecodeOptions; --stream
 * prints each piece of the caption as duet decodes it (a callback with a user pointer). Every
 * string duet returns is freed with duet_string_free and the runtime with duet_runtime_destroy.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duet.h"

static int fail(const char *what, DuetStatus status, char *error) {
    fprintf(stderr, "%s failed (status %d): %s\n", what, (int)status, error ? error : "(no message)");
    duet_string_free(error);
    return 1;
}

/* The streaming callback: `user` is the FILE to write to. */
static void print_piece(void *user, const char *text) {
    FILE *out = (FILE *)user;
    fputs(text, out);
    fflush(out);
}

int main(int argc, char **argv) {
    /* Zero-initialised but for its size: every field at its default (auto provider, not
     * strict, default library search, TensorRT without fp16 or engine cache). Every options
     * struct carries its size, so a library built with another duet.h refuses it. */
    DuetRuntimeOptions options = {.struct_size = sizeof options};
    DuetDecodeOptions decode = {.struct_size = sizeof decode};
    char *error = NULL;
    DuetStatus status = duet_decode_defaults(&decode, &error);
    if (status != DUET_STATUS_OK) {
        return fail("duet_decode_defaults", status, error);
    }
    const char *prompt = NULL;
    int stream = 0;
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--beam") == 0 && i + 1 < argc) {
            decode.strategy = DUET_DECODE_BEAM;
            decode.beam_width = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--temperature") == 0 && i + 1 < argc) {
            decode.strategy = DUET_DECODE_SAMPLE;
            decode.temperature = strtof(argv[++i], NULL);
        } else if (strcmp(argv[i], "--top-k") == 0 && i + 1 < argc) {
            decode.top_k = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--top-p") == 0 && i + 1 < argc) {
            decode.top_p = strtof(argv[++i], NULL);
        } else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
            decode.seed = strtoull(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--max-tokens") == 0 && i + 1 < argc) {
            decode.max_tokens = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--prompt") == 0 && i + 1 < argc) {
            prompt = argv[++i];
        } else if (strcmp(argv[i], "--stream") == 0) {
            stream = 1;
        } else if (strcmp(argv[i], "--provider") == 0 && i + 1 < argc) {
            options.provider = argv[++i];
        } else if (strcmp(argv[i], "--strict") == 0) {
            options.strict = true;
        } else if (strcmp(argv[i], "--ort-lib") == 0 && i + 1 < argc) {
            options.ort_library = argv[++i];
        } else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (argc - i < 2) {
        fprintf(stderr, "usage: %s [--provider P] [--strict] [--ort-lib PATH] [--beam N | --temperature T "
                        "[--top-k K] [--top-p P] [--seed S]] [--max-tokens N] [--prompt TEXT] [--stream] "
                        "BUNDLE IMAGE...\n", argv[0]);
        return 2;
    }
    fprintf(stderr, "duet %s\n", duet_version());

    DuetRuntime *rt = NULL;
    status = duet_runtime_create_with_options(argv[i], &options, &rt, &error);
    if (status != DUET_STATUS_OK) {
        return fail("duet_runtime_create_with_options", status, error);
    }

    char *report = NULL;
    status = duet_provider_report(rt, &report, &error);
    if (status != DUET_STATUS_OK) {
        duet_runtime_destroy(rt);
        return fail("duet_provider_report", status, error);
    }
    fprintf(stderr, "%s\n", report);
    duet_string_free(report);

    int rc = 0;
    for (i = i + 1; i < argc; i++) {
        char *caption = NULL;
        if (stream) {
            printf("%s\t", argv[i]);
            fflush(stdout);
        }
        status = duet_caption_file_with(rt, argv[i], prompt, &decode, stream ? print_piece : NULL,
                                        stdout, &caption, &error);
        if (status != DUET_STATUS_OK) {
            if (stream) {
                printf("\n");
            }
            rc = fail(argv[i], status, error);
            error = NULL;
            continue;
        }
        if (stream) {
            printf("\n"); /* the caption itself was printed piece by piece */
        } else {
            printf("%s\t%s\n", argv[i], caption);
        }
        duet_string_free(caption);
    }
    duet_runtime_destroy(rt);
    return rc;
}
