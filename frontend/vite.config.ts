/// <reference types="vitest/config" />
import react from "@vitejs/plugin-react";
import { defineConfig } from "vite";

// The page is served by the ingress (`/` and `/assets/...`) and, in production, from S3 + CloudFront;
// relative asset URLs let the same build live at any path.
export default defineConfig({
  base: "./",
  plugins: [react()],
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2022",
    sourcemap: true,
  },
  worker: {
    // The worklets are loaded with audioWorklet.addModule: each must be one self-contained file.
    format: "iife",
  },
  server: {
    // `npm run dev` next to `make demo`: the page on :5173 talks to the app on :8000.
    proxy: {
      "/v1": { target: "http://127.0.0.1:8000", ws: true },
      "/readyz": "http://127.0.0.1:8000",
      "/healthz": "http://127.0.0.1:8000",
    },
  },
  test: {
    include: ["src/**/*.test.ts"],
    environment: "node",
  },
});
