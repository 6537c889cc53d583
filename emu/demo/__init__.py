"""The demo system of Kandinsky (kandinsky_paper.txt, section 3): an image editor in the browser."""
