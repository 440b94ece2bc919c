/*
 * caption: caption image files with a duet bundle through the C ABI (libduet.so + duet.h).
 *
 *   cc -std=c11 -Wall -Wextra -I ffi/include examples/c/caption.c -L target/release -lduet -o caption
 *   ./caption [--provider auto|tensorrt|cuda|ort-cpu|tract] [--strict] [--ort-lib PATH] BUNDLE IMAGE...
 *
 * Prints "PATH<TAB>CAPTION" per image on stdout and the provider report on stderr. --ort-lib
 * names the libonnxruntime to load (as an application should; without it duet looks at
 * ORT_DYLIB_PATH, then .ort/lib/). Every
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

int main(int argc, char **argv) {
    /* Zero-initialised: every field at its default (auto provider, not strict, default
     * library search, TensorRT without fp16 or engine cache). */
    DuetRuntimeOptions options = {0};
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--provider") == 0 && i + 1 < argc) {
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
        fprintf(stderr, "usage: %s [--provider P] [--strict] [--ort-lib PATH] BUNDLE IMAGE...\n", argv[0]);
        return 2;
    }
    fprintf(stderr, "duet %s\n", duet_version());

    DuetRuntime *rt = NULL;
    char *error = NULL;
    DuetStatus status = duet_runtime_create_with_options(argv[i], &options, &rt, &error);
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
        status = duet_caption_file(rt, argv[i], &caption, &error);
        if (status != DUET_STATUS_OK) {
            rc = fail(argv[i], status, error);
            error = NULL;
            continue;
        }
        printf("%s\t%s\n", argv[i], caption);
        duet_string_free(caption);
    }
    duet_runtime_destroy(rt);
    return rc;
}
