/*
 * generate: draw an image from a text prompt with a duet bundle through the C ABI and write it
 * as a binary PPM (no image library needed in C).
 *
 *   cc -std=c11 -Wall -Wextra -I ffi/include examples/c/generate.c -L target/release -lduet -o generate
 *   ./generate [--provider P] [--strict] [--steps N] [--guidance G] [--seed S] BUNDLE OUT.ppm PROMPT
 *
 * The pixel buffer is the caller's: its size comes from duet_generate_image_size, the options
 * start from the bundle's defaults (duet_generate_defaults). The provider report goes to stderr.
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
    const char *provider = NULL; /* NULL = auto */
    bool strict = false;
    long steps = -1, seed = 0;
    double guidance = -1.0;
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--provider") == 0 && i + 1 < argc) {
            provider = argv[++i];
        } else if (strcmp(argv[i], "--strict") == 0) {
            strict = true;
        } else if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) {
            steps = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--guidance") == 0 && i + 1 < argc) {
            guidance = strtod(argv[++i], NULL);
        } else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
            seed = strtol(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (argc - i != 3) {
        fprintf(stderr, "usage: %s [--provider P] [--strict] [--steps N] [--guidance G] [--seed S] BUNDLE OUT.ppm PROMPT\n", argv[0]);
        return 2;
    }
    const char *bundle = argv[i], *out_path = argv[i + 1], *prompt = argv[i + 2];

    DuetRuntime *rt = NULL;
    char *error = NULL;
    DuetStatus status = duet_runtime_create(bundle, provider, strict, &rt, &error);
    if (status != DUET_STATUS_OK) {
        return fail("duet_runtime_create", status, error);
    }
    char *report = NULL;
    status = duet_provider_report(rt, &report, &error);
    if (status != DUET_STATUS_OK) {
        duet_runtime_destroy(rt);
        return fail("duet_provider_report", status, error);
    }
    fprintf(stderr, "%s\n", report);
    duet_string_free(report);

    uint32_t width = 0, height = 0;
    DuetGenerateOptions options = {.struct_size = sizeof options};
    status = duet_generate_image_size(rt, &width, &height, &error);
    if (status == DUET_STATUS_OK) {
        status = duet_generate_defaults(rt, &options, &error);
    }
    if (status != DUET_STATUS_OK) {
        duet_runtime_destroy(rt);
        return fail("reading the generator's settings", status, error);
    }
    if (steps >= 0) options.steps = (uint32_t)steps;
    if (guidance >= 0.0) options.guidance = (float)guidance;
    options.seed = (uint64_t)seed;

    size_t len = (size_t)width * height * 3;
    uint8_t *rgb = malloc(len);
    if (rgb == NULL) {
        duet_runtime_destroy(rt);
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    int rc = 0;
    status = duet_generate_rgb(rt, prompt, &options, rgb, len, &error);
    if (status != DUET_STATUS_OK) {
        rc = fail("duet_generate_rgb", status, error);
    } else {
        FILE *f = fopen(out_path, "wb");
        if (f == NULL || fprintf(f, "P6\n%u %u\n255\n", width, height) < 0 || fwrite(rgb, 1, len, f) != len) {
            fprintf(stderr, "cannot write %s\n", out_path);
            rc = 1;
        }
        if (f != NULL && fclose(f) != 0) {
            rc = 1;
        }
        if (rc == 0) {
            printf("%s\t%ux%u\tsteps %u\tguidance %g\tseed %llu\n", out_path, width, height, options.steps,
                   (double)options.guidance, (unsigned long long)options.seed);
        }
    }
    free(rgb);
    duet_runtime_destroy(rt);
    return rc;
}
